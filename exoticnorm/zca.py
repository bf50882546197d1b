"""Whitening norms: ZCA from a full-rank covariance, block-diagonal and sparsified ZCA.

Training: per group of c channels, mean μ and covariance Σ over every dim but C (summed over
processes inside an initialised process group), W ≈ Σ_reg^(-1/2), y = γ ∘ W (x − μ) + β.
Eval: the same map from ``running_mean`` and ``running_cov``, cached as one affine map.

Running statistics keep the covariance, not the whitening matrix: an average of covariances
is the covariance of the pooled batches (a consistent estimator), an average of whitening
matrices is not the whitening matrix of anything; the matrix is derived once per change.
The math is in ``exoticnorm.whitening``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as EF
from . import whitening as W
from .base import InputError, RunningStatsNorm
from .registry import register_norm

__all__ = ["ZCANorm", "BlockZCANorm", "SparseZCANorm"]

SHRINKAGE = ("auto", "lw")


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _Whitening(RunningStatsNorm):
    """Shared machinery of the ZCA family (see the module docstring)."""

    _running_stats = {"running_mean": (0.0, True), "running_cov": (0.0, False)}
    _convertible_state = ("weight", "bias")

    def __init__(
        self,
        num_features: int,
        group_size: int | None,
        density: float,
        sparsify: str,
        eps: float,
        momentum: float | None,
        affine: bool,
        track_running_stats: bool,
        method: str,
        iterations: int,
        shrinkage: str | float,
        process_group: Any,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        group_size = num_features if group_size is None else group_size
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        self._group_size = min(group_size, num_features) if num_features > 0 else group_size
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if method not in W.METHODS:
            raise ValueError(f"unknown method {method!r}; use one of {', '.join(W.METHODS)}")
        if not (isinstance(iterations, int) and iterations >= 1):
            raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
        if not (shrinkage in SHRINKAGE or (isinstance(shrinkage, (int, float))
                                           and not isinstance(shrinkage, bool) and 0 <= shrinkage <= 1)):
            raise ValueError(f"shrinkage must be 'auto', 'lw' or a number in [0, 1], got {shrinkage!r}")
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {density!r}")
        if sparsify not in ("whitening", "covariance"):
            raise ValueError(f"sparsify must be 'whitening' or 'covariance', got {sparsify!r}")
        self.method, self.iterations, self.shrinkage = method, iterations, shrinkage
        self.density, self.sparsify = float(density), sparsify
        self.process_group = process_group
        self._eval_cache: tuple | None = None

    @property
    def group_size(self) -> int:
        return self._group_size

    @property
    def num_groups(self) -> int:
        return math.ceil(self.num_features / self._group_size)

    def _running_shape(self, name: str) -> tuple[int, ...]:
        if name == "running_cov":
            return (self.num_groups, self._group_size, self._group_size)
        return super()._running_shape(name)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if self.track_running_stats:
            self.running_cov.copy_(torch.eye(self._group_size).expand_as(self.running_cov))

    # --- the transform ------------------------------------------------------------------

    def _grouped(self, v: Tensor | None, fill: float) -> Tensor | None:
        """(C,) → (G, c), padding with ``fill``."""
        if v is None:
            return None
        pad = self.num_groups * self._group_size - self.num_features
        return torch.cat([v, v.new_full((pad,), fill)]).view(self.num_groups, self._group_size)

    def _whiten(self, cov: Tensor, xc: Tensor | None) -> Tensor:
        """Σ (G, c, c) → the whitening matrix, after shrinkage, ridge and sparsification."""
        c = self._group_size
        rho: Tensor | float = 0.0
        if self.shrinkage == "lw" or (self.shrinkage == "auto" and xc is not None
                                      and xc.shape[-1] < 4 * c):
            rho = W.ledoit_wolf_intensity(xc, cov) if xc is not None else 0.0
        elif not isinstance(self.shrinkage, str):
            rho = float(self.shrinkage)
        cov = W.regularize(cov, self.eps, rho)
        if self.density < 1.0 and self.sparsify == "covariance":
            cov = W.threshold_covariance(cov, self.density, self.eps)
        w = W.inverse_sqrt(cov, self.method, self.iterations)
        if self.density < 1.0 and self.sparsify == "whitening":
            w = W.sparsify(w, cov, self.density)
        return w

    def _transform(self, xg: Tensor, w: Tensor, mean: Tensor) -> Tensor:
        """y = γ ∘ W (x − mean) + β as one batched multiply-add, grouped layout."""
        weight, bias = self._grouped(self.weight, 1.0), self._grouped(self.bias, 0.0)
        a = w if weight is None else w * weight.to(w.dtype).unsqueeze(-1)
        b = -(a @ mean.unsqueeze(-1))
        if bias is not None:
            b = b + bias.to(w.dtype).unsqueeze(-1)
        return torch.baddbmm(b, a, xg)

    def _batch_stats(self, xg: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Mean (G, c), biased covariance (G, c, c), sample count, and the samples and mean
        minus a shift (the detached local mean, or in a process group the running mean)."""
        if _distributed(self.process_group):
            shift = self._grouped(self.running_mean, 0.0) if self.track_running_stats else None
            shift = torch.zeros(xg.shape[:2], device=xg.device, dtype=xg.dtype) if shift is None else shift.to(xg.dtype)
            total, scatter, count = W.group_moments(xg, shift)
            from torch.distributed.nn.functional import all_reduce

            packed = torch.cat([total.flatten(), scatter.flatten(), count.reshape(1)])
            packed = all_reduce(packed, group=self.process_group)
            g, c = xg.shape[:2]
            total = packed[: g * c].view(g, c)
            scatter = packed[g * c : -1].view(g, c, c)
            count = packed[-1]
        else:
            shift = xg.mean(-1).detach()
            total, scatter, count = W.group_moments(xg, shift)
        mean_s = total / count
        cov = scatter / count - mean_s.unsqueeze(-1) * mean_s.unsqueeze(-2)
        return shift + mean_s, cov, count, xg - shift.unsqueeze(-1), mean_s

    def _normalize(self, x: Tensor) -> Tensor:
        if self.uses_batch_stats and EF.values_per_channel(x) <= 1:
            raise InputError(
                f"{type(self).__name__} got 1 value per channel in training (input shape "
                f"{tuple(x.shape)}); use a batch of at least 2 samples or call .eval()"
            )
        dtype = EF.stats_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xg = W.to_groups(x.to(dtype), self._group_size)
            if self.uses_batch_stats:
                mean, cov, count, xs, mean_s = self._batch_stats(xg)
                factor = self.update_factor()
                if self.training and self.track_running_stats:
                    unbiased = cov * (count / (count - 1).clamp_min(1))
                    EF.update_running(self.running_mean, mean.flatten()[: self.num_features], factor)
                    EF.update_running(self.running_cov, unbiased, factor)
                w = self._whiten(cov, xs)
                y = self._transform(xs, w, mean_s)
            else:
                y = self._transform(xg, *self._eval_map(dtype))
        return W.from_groups(y, x).to(x.dtype)

    def _eval_map(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(W, mean) from the running statistics, recomputed only when they change."""
        key = (self.running_mean._version, self.running_cov._version, self.eps, self.density,
               self.running_cov.device, dtype)
        if self._eval_cache is None or self._eval_cache[0] != key:
            with torch.no_grad():
                cov = self.running_cov.to(dtype)
                w = self._whiten(cov, None)
                self._eval_cache = (key, w, self._grouped(self.running_mean, 0.0).to(dtype))
        return self._eval_cache[1], self._eval_cache[2]

    def eval_affine(self) -> tuple[Tensor, Tensor]:
        """The eval transform as one affine map y = A x + b on (C,) vectors: (A (C, C), b (C,))."""
        w, mean = self._eval_map(EF.stats_dtype(self.running_cov))
        a = torch.block_diag(*w)[: self.num_features, : self.num_features]
        if self.weight is not None:
            a = a * self.weight.detach().to(a.dtype).unsqueeze(-1)
        b = -(a @ mean.flatten()[: self.num_features])
        if self.bias is not None:
            b = b + self.bias.detach().to(a.dtype)
        return a, b

    def _extra_fields(self) -> dict[str, Any]:
        return {**super()._extra_fields(), "method": self.method, "shrinkage": self.shrinkage}


@register_norm("zca")
class ZCANorm(_Whitening):
    """ZCA whitening from the full C×C covariance: y = γ ∘ Σ^(-1/2) (x − μ) + β.

    method: "eigh" (exact, with a backward that stays finite at repeated eigenvalues),
    "newton" (``iterations`` Newton–Schulz steps, IterNorm's scheme: a few iterations do not
    fully whiten ill-conditioned inputs) or "auto". eps is a ridge added to Σ; shrinkage toward
    a scaled identity is Ledoit–Wolf's when "lw", when "auto" and a group sees fewer than 4c
    samples, or a fixed fraction when a number.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, method: str = "auto",
                 iterations: int = 5, shrinkage: str | float = "auto", process_group: Any = None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, None, 1.0, "whitening", eps, momentum, affine,
                         track_running_stats, method, iterations, shrinkage, process_group,
                         device, dtype)


@register_norm("block-zca")
class BlockZCANorm(_Whitening):
    """Block-diagonal ZCA: channels in groups of ``group_size`` (the last may be smaller), each
    whitened on its own in one batched computation. group_size=1 is per-channel
    standardization (BatchNorm); group_size=C is ``zca``."""

    def __init__(self, num_features: int, group_size: int = 16, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, method: str = "auto", iterations: int = 5,
                 shrinkage: str | float = "auto", process_group: Any = None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, group_size, 1.0, "whitening", eps, momentum, affine,
                         track_running_stats, method, iterations, shrinkage, process_group,
                         device, dtype)

    def _extra_fields(self) -> dict[str, Any]:
        return {"group_size": self.group_size, **super()._extra_fields()}


@register_norm("sparse-zca")
class SparseZCANorm(_Whitening):
    """Sparsified ZCA: keep the ``density`` fraction of largest off-diagonal entries.

    sparsify="whitening" (default) sparsifies W = Σ^(-1/2), then rescales each row so every
    output has unit variance; sparsify="covariance" thresholds the correlations of Σ
    (Bickel–Levina), lifts it back to positive definite, and whitens that. density=1 is
    ``zca``; density=0 is per-channel standardization.
    """

    def __init__(self, num_features: int, density: float = 0.5, sparsify: str = "whitening",
                 eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, method: str = "auto", iterations: int = 5,
                 shrinkage: str | float = "auto", process_group: Any = None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, None, density, sparsify, eps, momentum, affine,
                         track_running_stats, method, iterations, shrinkage, process_group,
                         device, dtype)

    def _extra_fields(self) -> dict[str, Any]:
        return {"density": self.density, "sparsify": self.sparsify, **super()._extra_fields()}
