"""What every exoticnorm layer shares, so each norm adds only its math.

``Norm``: channels-first input checks, the per-channel affine γ (``weight``) and β (``bias``),
``extra_repr`` and state_dict versioning. ``RunningStatsNorm`` adds running statistics with
torch's momentum convention (``momentum=None`` = cumulative average) and
``num_batches_tracked``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import functional as EF

__all__ = ["Norm", "RunningStatsNorm", "InputError"]

_RANKS = "(N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W)"


class InputError(ValueError):
    """An input a norm cannot normalize; the message says what was wrong and what to do."""


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class Norm(nn.Module):
    """Base class: subclasses implement ``_normalize(x)`` on already-checked input.

    Parameters are ``weight`` (γ, ones) and ``bias`` (β, zeros) of shape (C,) when
    ``affine``; ``_convertible_state`` names the state ``convert_norms`` may copy into this
    norm from another norm where it means the same thing.
    """

    _version = 1
    _convertible_state: tuple[str, ...] = ("weight", "bias")
    #: True when eval statistics should be recomputed with the final weights before evaluating
    #: (``exoticnorm.precise.precise_statistics``): norms whose eval transform amplifies
    #: small errors in lagging running statistics, such as whitening.
    precise_eval = False

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.num_features = _check_positive_int("num_features", num_features)
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.eps = float(eps)
        self.affine = bool(affine)
        if self.affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            self.bias = nn.Parameter(torch.empty(num_features, **factory_kwargs))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """γ ← 1, β ← 0."""
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def check_input(self, x: Tensor) -> None:
        """Raise a clear error for anything but a floating (N, C, *spatial) tensor with C channels."""
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"{name} expects a floating-point tensor, got {x.dtype}; convert it with x.float()"
            )
        if not 2 <= x.ndim <= 5:
            raise InputError(
                f"{name} expects {_RANKS} input, got shape {tuple(x.shape)} ({x.ndim}-d); "
                "channels come first after the batch dim"
            )
        if x.shape[1] != self.num_features:
            raise InputError(
                f"{name} was built for {self.num_features} channels but input of shape "
                f"{tuple(x.shape)} has {x.shape[1]} in dim 1; build it with "
                f"num_features={x.shape[1]} or check that the input is channels-first"
            )

    #: The methods a norm's ``_fast_train_step`` stands in for. That method, where a norm has one,
    #: is a training step with the fewest Python ops (each small op around a C++ kernel's passes
    #: runs with cold caches, several µs apiece): it returns y for the common case and None for
    #: anything else, including all input ``check_input``/``_check_batch`` would reject, which then
    #: takes the full forward. A subclass that overrides one of these methods keeps the full forward
    #: (decided when the class is made; ``module._lean = False`` turns the lean step off for one module).
    _lean_covers: tuple[str, ...] = ()
    _lean = False  # set per class (__init_subclass__)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        owner = next((k for k in cls.__mro__ if "_fast_train_step" in k.__dict__), None)
        cls._lean = owner is not None and all(getattr(cls, name) is getattr(owner, name)
                                              for name in owner._lean_covers)

    def forward(self, x: Tensor) -> Tensor:
        if self._lean and self.training:
            y = self._fast_train_step(x)
            if y is not None:
                return y
        self.check_input(x)
        if x.numel() == 0:  # as torch: an empty batch gives an empty output, statistics untouched
            return EF.affine_normalize(x, None, None, self.weight, self.bias, 0.0).clone()
        if self.uses_batch_stats:
            self._check_batch(x)
        return self._normalize(x)

    #: spatial dims the input needs at least (1 for per-sample, per-channel norms such as "in")
    min_spatial_dims = 0
    #: True for norms that compute statistics over the batch (they need 2+ values per channel)
    batch_statistics = False
    #: False for norms whose training transform cannot run under torch.func.vmap
    vmap_training = True

    @property
    def uses_batch_stats(self) -> bool:
        """True when this forward computes statistics over the batch."""
        return self.batch_statistics and self.training

    def _check_batch(self, x: Tensor) -> None:
        name = type(self).__name__
        if EF.values_per_channel(x) <= 1:
            raise InputError(
                f"{name} got 1 value per channel in training (input shape {tuple(x.shape)}), and "
                "batch statistics need at least 2; train with a batch of at least 2 samples, "
                "call .eval() to use the running statistics, or use a per-sample norm such as "
                "'gn' or 'ln'"
            )
        tracking = self.training and getattr(self, "track_running_stats", False)
        if (tracking or not self.vmap_training) and torch._C._functorch.is_batchedtensor(x):
            raise InputError(
                f"{name} does not support torch.func.vmap in training: its running statistics "
                "would be updated in place from a vmapped batch (and whitening/PIT batch "
                "statistics run in custom autograd Functions); call .eval() inside vmap, or "
                "loop over the vmapped dimension"
            )

    def _normalize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        fields = {"eps": self.eps, "affine": self.affine, **self._extra_fields()}
        return ", ".join([str(self.num_features)] + [f"{k}={v}" for k, v in fields.items()])

    def _extra_fields(self) -> dict[str, Any]:
        return {}


class RunningStatsNorm(Norm):
    """A norm with running statistics for eval mode.

    Subclasses list their buffers in ``_running_stats`` as name → (fill value, per channel);
    per-channel buffers have shape (C,), the others are scalars. In training each batch moves
    them by ``update_factor()``: ``momentum``, or 1 / num_batches_tracked when ``momentum`` is
    None (a cumulative average). ``track_running_stats=False`` keeps no buffers and uses batch
    statistics in eval mode too.
    """

    _running_stats: dict[str, tuple[float, bool]] = {
        "running_mean": (0.0, True),
        "running_var": (1.0, True),
    }

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, affine, device, dtype)
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None (cumulative), got {momentum!r}")
        self.momentum = momentum
        self.track_running_stats = bool(track_running_stats)
        for name in self._running_stats:
            shape = self._running_shape(name)
            buffer = torch.empty(shape, device=device, dtype=dtype) if track_running_stats else None
            self.register_buffer(name, buffer)
        tracked = torch.tensor(0, dtype=torch.long, device=device) if track_running_stats else None
        self.register_buffer("num_batches_tracked", tracked)
        self.reset_running_stats()

    def _running_shape(self, name: str) -> tuple[int, ...]:
        return (self.num_features,) if self._running_stats[name][1] else ()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            for name, (fill, _) in self._running_stats.items():
                getattr(self, name).fill_(fill)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        if hasattr(self, "num_batches_tracked"):
            self.reset_running_stats()
        super().reset_parameters()

    batch_statistics = True
    #: False for norms without a cumulative mode (momentum=None), which precise statistics skip
    cumulative = True

    @property
    def uses_batch_stats(self) -> bool:
        """True in training, and in eval when no running statistics are kept."""
        return self.training or not self.track_running_stats

    def update_factor(self) -> float:
        """Count this batch and return how far the running statistics move toward it."""
        if not (self.training and self.track_running_stats):
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _extra_fields(self) -> dict[str, Any]:
        return {"momentum": self.momentum, "track_running_stats": self.track_running_stats}

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Version None is a state_dict from before versioning (or from elsewhere) that may lack
        # num_batches_tracked: start its count at 0 rather than fail a strict load.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 1) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long, device=self.num_batches_tracked.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
