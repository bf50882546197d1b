"""Per-sample norms (fastai's lesson): GroupNorm, with LayerNorm and InstanceNorm as its limits."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import functional as EF
from .base import InputError, Norm

__all__ = ["GroupNorm", "LayerNorm", "InstanceNorm"]


class GroupNorm(Norm):
    """Group norm: per sample, normalize each group of C/G channels over (channels, *spatial).

    y = (x − μ_ng) / sqrt(σ²_ng + eps) · γ_c + β_c. No running statistics: train and eval agree.
    ``num_groups`` must divide ``num_features``; the default 2 divides every LeNet width.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int = 2,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, affine, device, dtype)
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
            raise ValueError(f"num_groups must be a positive integer, got {num_groups!r}")
        if num_features % num_groups:
            divisors = [g for g in range(1, num_features + 1) if num_features % g == 0]
            raise ValueError(
                f"num_groups={num_groups} does not divide num_features={num_features}; "
                f"choose one of {divisors}"
            )
        self.num_groups = num_groups

    def _normalize(self, x: Tensor) -> Tensor:
        if self.num_features // self.num_groups * math.prod(x.shape[2:]) <= 1:
            raise InputError(
                f"{type(self).__name__} with {self.num_groups} groups sees 1 value per group in "
                f"input of shape {tuple(x.shape)}, so every output would be β; use fewer groups "
                "or input with spatial dims"
            )
        return EF.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def _extra_fields(self):
        return {"num_groups": self.num_groups}


class LayerNorm(GroupNorm):
    """Layer norm, channels-first: per sample over (C, *spatial), then per-channel γ, β (G = 1)."""

    def __init__(self, num_features, eps=1e-5, affine=True, device=None, dtype=None) -> None:
        super().__init__(num_features, 1, eps, affine, device, dtype)

    def _extra_fields(self):
        return {}


class InstanceNorm(GroupNorm):
    """Instance norm: per sample and per channel over the spatial dims (G = C), with γ, β.

    Unlike torch.nn.InstanceNorm2d the affine is on by default, as for every exoticnorm norm.
    """

    min_spatial_dims = 1

    def __init__(self, num_features, eps=1e-5, affine=True, device=None, dtype=None) -> None:
        super().__init__(num_features, num_features, eps, affine, device, dtype)

    def _extra_fields(self):
        return {}
