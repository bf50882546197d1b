"""d2l's LeNet-5 with a pluggable norm after each conv/linear layer, before its activation."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable

from torch import Tensor, nn

from ..registry import create_norm

__all__ = ["LeNet", "NORM_SITES", "LAYER_SETS", "ACTIVATIONS"]

NORM_SITES = ("conv1", "conv2", "fc1", "fc2")
LAYER_SETS = {
    "all": NORM_SITES,
    "conv": ("conv1", "conv2"),
    "fc": ("fc1", "fc2"),
    "first": ("conv1",),
    "last": ("fc2",),
    "none": (),
}
ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


def _sites(norm_layers: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(norm_layers, str):
        if norm_layers not in LAYER_SETS:
            raise ValueError(
                f"unknown norm_layers {norm_layers!r}; use one of {', '.join(LAYER_SETS)} "
                f"or a list of sites from {', '.join(NORM_SITES)}"
            )
        return LAYER_SETS[norm_layers]
    sites = tuple(norm_layers)
    bad = [s for s in sites if s not in NORM_SITES]
    if bad:
        raise ValueError(f"unknown norm sites {bad}; the sites are {', '.join(NORM_SITES)}")
    return sites


def check_activation_dropout(activation: str, dropout: float) -> None:
    """The arguments every reference model shares, checked with one message."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


class LeNet(nn.Module):
    """LeNet-5 as in d2l's batch-norm chapter, for 1×28×28 images:

    conv(6, 5×5) → norm → act → avgpool(2) → conv(16, 5×5) → norm → act → avgpool(2) → flatten
    → fc(120) → norm → act → fc(84) → norm → act → fc(10).

    norm, norm_kwargs: a registered norm name and its options.
    norm_layers: which of conv1, conv2, fc1, fc2 get a norm: "all" (default), "conv", "fc",
        "first", "last", "none", or a list of sites.
    dropout: probability of dropout after the activations of fc1 and fc2 (0 = none); with
        ``norm_layers="conv"`` it replaces the fc norms, with "all" it sits beside them.
    bias: False drops the bias of every conv/linear layer that a norm follows (d2l's first
        exercise: a norm's mean subtraction cancels it).
    activation: sigmoid (d2l), relu, tanh, gelu or silu.
    Weights get d2l's Xavier-uniform init.
    """

    def __init__(
        self,
        norm: str = "bn",
        norm_kwargs: dict[str, Any] | None = None,
        norm_layers: str | Iterable[str] = "all",
        dropout: float = 0.0,
        bias: bool = True,
        activation: str = "sigmoid",
        num_classes: int = 10,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        check_activation_dropout(activation, dropout)
        sites = _sites(norm_layers)
        norm_kwargs = dict(norm_kwargs or {})
        self.norm_sites = sites
        act = ACTIVATIONS[activation]
        layers: list[tuple[str, nn.Module]] = []

        def block(site: str, layer_type, n_in: int, n_out: int, **kw) -> None:
            has_norm = site in sites
            layers.append((site, layer_type(n_in, n_out, bias=bias or not has_norm, **kw)))
            if has_norm:
                layers.append((f"norm_{site}", create_norm(norm, n_out, **norm_kwargs)))
            layers.append((f"act_{site}", act()))

        block("conv1", nn.Conv2d, in_channels, 6, kernel_size=5)
        layers.append(("pool1", nn.AvgPool2d(2, 2)))
        block("conv2", nn.Conv2d, 6, 16, kernel_size=5)
        layers.append(("pool2", nn.AvgPool2d(2, 2)))
        layers.append(("flatten", nn.Flatten()))
        block("fc1", nn.Linear, 16 * 4 * 4, 120)
        if dropout:
            layers.append(("drop_fc1", nn.Dropout(dropout)))
        block("fc2", nn.Linear, 120, 84)
        if dropout:
            layers.append(("drop_fc2", nn.Dropout(dropout)))
        layers.append(("fc3", nn.Linear(84, num_classes)))
        self.net = nn.Sequential(OrderedDict(layers))
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)

    def norms(self) -> dict[str, nn.Module]:
        """site → norm module, for the sites that have one."""
        return {site: getattr(self.net, f"norm_{site}") for site in self.norm_sites}

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
