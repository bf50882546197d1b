"""Group whitening (Huang, Zhou, Liu, Zhu & Shao, "Group Whitening: Balancing Learning
Efficiency and Representational Capacity", CVPR 2021).

Per sample, the C channels are split into g groups of C/g consecutive channels, and the
sample's values are viewed as a g × m matrix X (m = C/g · prod(spatial): row i holds every
value of group i, over its channels and positions). Each row is centred (as group norm does)
and the g rows are then decorrelated:

    μ = X 1/m,   Σ = (X − μ1ᵀ)(X − μ1ᵀ)ᵀ / m,   X̂ = Σ_reg^(-1/2) (X − μ1ᵀ),   y = γ ∘ X̂ + β.

So the statistics never cross samples: the same in training and eval, at batch size 1 too,
and nothing to sync between processes. g = 1 is LayerNorm; with only standardization (Σ's
diagonal) it is GroupNorm. For (N, C) input (one position) a row holds the group's C/g
channels, as in the paper's MLP experiments; groups of one channel there (m = 1) leave
nothing to whiten and raise an error. With m < g the per-sample Σ is singular: Σ_reg adds
Ledoit–Wolf shrinkage (``shrinkage="auto"`` when m < 4g, differentiated) and the ridge eps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from . import functional as EF
from . import whitening as W
from .base import InputError, Norm

__all__ = ["GroupWhitening", "group_whiten", "default_num_groups"]


def default_num_groups(channels: int, cap: int = 16) -> int:
    """The largest divisor of C that is at most min(cap, C/2), so that every group has at
    least two channels (1 for C = 1)."""
    limit = max(1, min(cap, channels // 2))
    return max(d for d in range(1, limit + 1) if channels % d == 0)


def group_whiten(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
                 spec: W.WhiteningSpec) -> Tensor:
    """Group whitening of x (N, C, *s) in its own dtype (see the module docstring): per sample,
    the g × m matrix of groups is centred per row and whitened with W(Σ) as ``spec`` says
    (``spec.transform``, shrinkage, ridge), then γ, β per channel. Plain autograd (ρ included)."""
    rows = rearrange(x, "n (g c) ... -> n g (c ...)", g=num_groups)
    xc = rows - rows.mean(-1, keepdim=True)
    m = rows.shape[-1]
    cov = xc @ xc.mT / m  # (N, g, g): one covariance per sample
    rho = W.shrinkage_intensity(cov, xc.unsqueeze(0), spec, differentiable=True)
    y = (W.whitening_matrix(cov, rho, spec) @ xc).reshape(x.shape)
    return EF.affine_normalize(y, None, None, weight, bias, 0.0)


class GroupWhitening(Norm):
    """Group whitening (Huang et al. 2021): per sample, whiten the g groups of C/g channels
    against each other over their values: y = γ ∘ Σ_n^(-1/2)(X_n − μ_n 1ᵀ) + β.

    ``num_groups`` g must divide C (an error lists the valid ones); the default (None) is the
    largest divisor of C up to min(16, C/2). Batch-independent: no running statistics, eval
    equals training, batch size 1 works. Options: eps (ridge), shrinkage ("auto": Ledoit–Wolf
    when a group has fewer than 4g values, "lw", or a fixed fraction), method/iterations
    ("eigh" exact, "newton" IterNorm's iteration as in the paper's ItN variant), transform
    ("zca", "cholesky", "pca"; see ``exoticnorm.whitening``).
    """

    def __init__(self, num_features: int, num_groups: int | None = None, eps: float = 1e-5,
                 affine: bool = True, shrinkage: str | float = "auto", method: str = "auto",
                 iterations: int = 5, transform: str = "zca", device=None, dtype=None) -> None:
        super().__init__(num_features, eps, affine, device, dtype)
        if num_groups is None:
            num_groups = default_num_groups(num_features)
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
            raise ValueError(f"num_groups must be a positive integer, got {num_groups!r}")
        if num_features % num_groups:
            valid = [g for g in range(1, num_features + 1) if num_features % g == 0]
            raise ValueError(f"num_groups={num_groups} does not divide num_features={num_features}; "
                             f"choose one of {valid}")
        if method not in W.METHODS:
            raise ValueError(f"unknown method {method!r}; use one of {', '.join(W.METHODS)}")
        if transform not in W.TRANSFORMS:
            raise ValueError(f"unknown transform {transform!r}; use one of {', '.join(W.TRANSFORMS)}")
        if transform != "zca" and method == "newton":
            raise ValueError("method='newton' computes Σ^(-1/2) (transform='zca') only")
        if not (isinstance(iterations, int) and iterations >= 1):
            raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
        if not (shrinkage in ("auto", "lw") or (isinstance(shrinkage, (int, float))
                                                 and not isinstance(shrinkage, bool) and 0 <= shrinkage <= 1)):
            raise ValueError(f"shrinkage must be 'auto', 'lw' or a number in [0, 1], got {shrinkage!r}")
        self.num_groups, self.shrinkage, self.method = num_groups, shrinkage, method
        self.iterations, self.transform = iterations, transform

    @property
    def spec(self) -> W.WhiteningSpec:
        return W.WhiteningSpec(self.eps, self.shrinkage, 1.0, "whitening", self.method,
                               self.iterations, self.transform)

    def _normalize(self, x: Tensor) -> Tensor:
        values = self.num_features // self.num_groups * math.prod(x.shape[2:])
        if values <= 1:
            raise InputError(
                f"{type(self).__name__} with {self.num_groups} groups sees 1 value per group and "
                f"sample in input of shape {tuple(x.shape)}, so there is nothing to whiten; use "
                "fewer groups (num_groups <= C/2) or input with spatial dims")
        return self._whiten(x)

    @torch.compiler.disable  # eigh with a custom backward: eager only (a graph break)
    def _whiten(self, x: Tensor) -> Tensor:
        with EF.autocast_off(x):
            dtype = EF.stats_dtype(x)
            weight, bias = (None if p is None else p.to(dtype) for p in (self.weight, self.bias))
            return group_whiten(x.to(dtype), self.num_groups, weight, bias, self.spec).to(x.dtype)

    def _extra_fields(self) -> dict[str, Any]:
        fields = {"num_groups": self.num_groups, "shrinkage": self.shrinkage, "method": self.method}
        if self.transform != "zca":
            fields["transform"] = self.transform
        return fields
