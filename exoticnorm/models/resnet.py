"""A narrow CIFAR-style residual network for 1×28×28 images, with a pluggable norm after every conv."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable

from torch import Tensor, nn

from ..registry import create_norm
from .lenet import ACTIVATIONS, check_activation_dropout

__all__ = ["ResNet", "BasicBlock"]

STAGES = 3  # widths width, 2·width, 4·width; stages 2 and 3 halve the map (28 → 14 → 7)


def _make_act(activation: str) -> nn.Module:
    # In place only for ReLU: every norm copes with relu_ on its output (tests/test_contract.py),
    # and each ReLU here acts on a norm's output or on a fresh sum, never on a tensor that is
    # also the shortcut.
    cls = ACTIVATIONS[activation]
    return cls(inplace=True) if cls is nn.ReLU else cls()


class _ConvNorm(nn.Sequential):
    """conv (→ norm): the norm is left out when its site has none; the conv then keeps its bias."""

    def __init__(self, n_in: int, n_out: int, kernel_size: int, stride: int, bias: bool,
                 norm: str | None, norm_kwargs: dict[str, Any]) -> None:
        layers: list[tuple[str, nn.Module]] = [("conv", nn.Conv2d(
            n_in, n_out, kernel_size, stride=stride, padding=kernel_size // 2,
            bias=bias or norm is None))]
        if norm is not None:
            layers.append(("norm", create_norm(norm, n_out, **norm_kwargs)))
        super().__init__(OrderedDict(layers))


class BasicBlock(nn.Module):
    """conv3×3 → norm → act → conv3×3 → norm, plus the shortcut, then act.

    The shortcut is the identity, or (``downsample``) conv1×1 with the block's stride → norm
    (He et al.'s option B). ``norms`` maps "1", "2", "down" to the norm (or None) at each.
    """

    def __init__(self, n_in: int, n_out: int, stride: int, bias: bool, activation: str,
                 norms: dict[str, str | None], norm_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.unit1 = _ConvNorm(n_in, n_out, 3, stride, bias, norms["1"], norm_kwargs)
        self.act1 = _make_act(activation)
        self.unit2 = _ConvNorm(n_out, n_out, 3, 1, bias, norms["2"], norm_kwargs)
        self.down = (_ConvNorm(n_in, n_out, 1, stride, bias, norms["down"], norm_kwargs)
                     if stride != 1 or n_in != n_out else None)
        self.act2 = _make_act(activation)

    def forward(self, x: Tensor) -> Tensor:
        out = self.unit2(self.act1(self.unit1(x)))
        shortcut = x if self.down is None else self.down(x)
        return self.act2(out + shortcut)  # out of place: x is not touched


def _all_sites(blocks_per_stage: int) -> tuple[str, ...]:
    sites = ["stem"]
    for s in range(1, STAGES + 1):
        for b in range(1, blocks_per_stage + 1):
            sites += [f"s{s}b{b}.1", f"s{s}b{b}.2"]
            if s > 1 and b == 1:  # the first block of stages 2 and 3 changes the shape
                sites.append(f"s{s}b{b}.down")
    return tuple(sites)


def _sites(norm_layers: str | Iterable[str], all_sites: tuple[str, ...]) -> tuple[str, ...]:
    accepted = (f"ResNet takes norm_layers 'all', 'none' or a list of its norm sites "
                f"({', '.join(all_sites)})")
    if isinstance(norm_layers, str):
        if norm_layers == "all":
            return all_sites
        if norm_layers == "none":
            return ()
        raise ValueError(f"unknown norm_layers {norm_layers!r}: {accepted}")
    wanted = set(norm_layers)
    bad = sorted(wanted - set(all_sites))
    if bad:
        raise ValueError(f"unknown norm sites {bad}: {accepted}")
    return tuple(s for s in all_sites if s in wanted)  # forward order


class ResNet(nn.Module):
    """A narrow CIFAR-style ResNet (He et al. 2016, §4.2) for 1×28×28 images:

    stem: conv3×3(in_channels → width) → norm → act;
    three stages of ``blocks_per_stage`` basic blocks, widths width, 2·width, 4·width, the
    first block of stages 2 and 3 with stride 2 (28 → 14 → 7); a basic block is
    conv3×3 → norm → act → conv3×3 → norm, plus the shortcut (identity, or conv1×1 stride 2 →
    norm where the shape changes: option B), then act;
    global average pool → (dropout) → linear(4·width → num_classes).

    blocks_per_stage=1 is a ResNet-8 (7 3×3 convs + fc), 3 a ResNet-20 (19 + fc); both also
    have the two 1×1 shortcut convs, which the names do not count. A norm follows every conv
    (with the default ``norm_layers="all"``).

    norm, norm_kwargs: a registered norm name and its options (channels first).
    norm_layers: "all" (default), "none", or a list of sites from ``norm_sites``
        ("stem", "s1b1.1", "s1b1.2", "s2b1.down", ...: stage s, block b, its first or second
        conv or its shortcut conv). LeNet's "conv", "fc", "first", "last" are rejected.
    dropout: probability of dropout before the final linear layer (0 = none).
    bias: False drops the bias of every conv that a norm follows.
    activation: relu (default; in place), sigmoid, tanh, gelu or silu.
    Convs get He init (kaiming normal, fan_out, relu) and zero bias; norms keep their own
    init: the last norm of each residual branch is not zero-initialised (simple and the same
    for every norm, some of which have no γ).
    """

    def __init__(
        self,
        norm: str = "bn",
        norm_kwargs: dict[str, Any] | None = None,
        norm_layers: str | Iterable[str] = "all",
        dropout: float = 0.0,
        bias: bool = True,
        activation: str = "relu",
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 8,
        blocks_per_stage: int = 1,
    ) -> None:
        super().__init__()
        check_activation_dropout(activation, dropout)
        if width < 1 or blocks_per_stage < 1:
            raise ValueError(f"width and blocks_per_stage must be positive, got {width}, {blocks_per_stage}")
        sites = _sites(norm_layers, _all_sites(blocks_per_stage))
        self.norm_sites = sites
        norm_kwargs = dict(norm_kwargs or {})

        def norm_at(site: str) -> str | None:
            return norm if site in sites else None

        self.stem = _ConvNorm(in_channels, width, 3, 1, bias, norm_at("stem"), norm_kwargs)
        self.stem_act = _make_act(activation)
        blocks: list[tuple[str, nn.Module]] = []
        n_in = width
        for s in range(1, STAGES + 1):
            n_out = width * 2 ** (s - 1)
            for b in range(1, blocks_per_stage + 1):
                name = f"s{s}b{b}"
                stride = 2 if s > 1 and b == 1 else 1
                block_norms = {k: norm_at(f"{name}.{k}") for k in ("1", "2", "down")}
                blocks.append((name, BasicBlock(n_in, n_out, stride, bias, activation, block_norms,
                                                norm_kwargs)))
                n_in = n_out
        self.blocks = nn.Sequential(OrderedDict(blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(n_in, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def norms(self) -> dict[str, nn.Module]:
        """site → norm module, for the sites that have one (in forward order)."""
        found = {}
        for site in self.norm_sites:
            if site == "stem":
                found[site] = self.stem.norm
            else:
                block, unit = site.split(".")
                attr = "down" if unit == "down" else f"unit{unit}"
                found[site] = getattr(getattr(self.blocks, block), attr).norm
        return found

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem_act(self.stem(x))
        x = self.blocks(x)
        return self.fc(self.drop(self.flatten(self.pool(x))))
