"""Batch normalization and its d2l variants: lite (mean-only, variance-only) and fixed affine."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed
from . import functional as EF
from .base import RunningStatsNorm

__all__ = ["BatchNorm", "BatchNormMean", "BatchNormVar", "FrozenAffineBatchNorm"]


class BatchNorm(RunningStatsNorm):
    """Batch normalization: y = (x − μ_B) / sqrt(σ²_B + eps) · γ + β over every dim but C.

    A drop-in for torch.nn.BatchNorm1d/2d/3d (one class for every rank) with the same
    arguments, buffers and state_dict keys. Eval mode uses ``running_mean`` and the unbiased
    ``running_var``. The full form dispatches to torch's fused kernel; the lite subclasses run
    ``exoticnorm.functional.batch_norm``, the same math written out.

    Non-finite input is not hidden: NaN/Inf propagate to the output and, in training, into the
    running statistics, as in torch.

    Synced: in training inside an initialized process group of 2+ processes (``process_group``,
    default all), the statistics are those of every process's batch together, as in
    torch.nn.SyncBatchNorm, on the CPU too: mean, biased variance (unbiased, from the global
    count, for ``running_var``) and gradients across processes (``distributed.synced_moments``).
    Eval mode never syncs. A group of one process (``dist.new_group([rank])``) opts out.
    """

    _center = True
    _scale = True
    _convertible_state = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        process_group: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _normalize(self, x: Tensor) -> Tensor:
        if self.training and distributed.synced(self.process_group):
            return self._synced_normalize(x)
        factor = self.update_factor()
        running_mean = getattr(self, "running_mean", None)
        running_var = getattr(self, "running_var", None)
        if self._center and self._scale:
            return F.batch_norm(
                x, running_mean, running_var, self.weight, self.bias,
                self.uses_batch_stats, factor, self.eps,
            )
        return EF.batch_norm(
            x, running_mean, running_var, self.weight, self.bias,
            self.uses_batch_stats, factor, self.eps, center=self._center, scale=self._scale,
        )

    def _synced_normalize(self, x: Tensor) -> Tensor:
        """Training with the statistics of every process's batch (see the class docstring); the
        running mean, equal on all ranks, is the shift of the summed moments."""
        factor = self.update_factor()
        running_mean = getattr(self, "running_mean", None)
        running_var = getattr(self, "running_var", None)
        dtype = EF.stats_dtype(x)
        with EF.autocast_off(x):
            shift = running_mean if running_mean is not None else x.new_zeros(x.shape[1], dtype=dtype)
            mean, var, count = distributed.synced_moments(x.to(dtype), shift, self.process_group)
            if self._center:
                EF.update_running(running_mean, mean, factor)
            if self._scale:
                EF.update_running(running_var, var * (count / (count - 1)), factor)
            return EF.affine_normalize(x, mean if self._center else None, var if self._scale else None,
                                       self.weight, self.bias, self.eps)

    @torch.no_grad()
    def eval_affine(self) -> tuple[Tensor, Tensor]:
        """The eval transform as y = A x + b on (C,) vectors: A = diag(γ/√(σ²+eps)), b = β − A μ
        (without the centring or the scaling for the lite variants)."""
        if not self.track_running_stats:
            raise ValueError(f"{type(self).__name__} without running statistics has no eval map")
        ref = next(t for t in (self.weight, getattr(self, "running_mean", None),
                               getattr(self, "running_var", None)) if t is not None)
        scale = ref.new_ones(self.num_features)
        if self._scale:
            scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -scale * self.running_mean if self._center else torch.zeros_like(scale)
        if self.bias is not None:
            shift = shift + self.bias
        return torch.diag(scale), shift


class BatchNormMean(BatchNorm):
    """Lite batch norm that only centres: y = (x − μ_B) · γ + β (no division by the std)."""

    _scale = False
    _running_stats = {"running_mean": (0.0, True)}
    _convertible_state = ("weight", "bias", "running_mean", "num_batches_tracked")


class BatchNormVar(BatchNorm):
    """Lite batch norm that only scales: y = x / sqrt(σ²_B + eps) · γ + β (the mean stays)."""

    _center = False
    _running_stats = {"running_var": (1.0, True)}
    _convertible_state = ("weight", "bias", "running_var", "num_batches_tracked")


class FrozenAffineBatchNorm(BatchNorm):
    """Batch norm with γ, β fixed (not trained): γ = 1, β = 0 unless converted from a trained norm.

    Unlike torchvision's FrozenBatchNorm2d the statistics are not frozen: only the affine is.
    ``weight`` and ``bias`` are buffers, so optimizers never see them.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        process_group: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, False, track_running_stats, device, dtype,
                         process_group)
        del self.weight, self.bias
        self.register_buffer("weight", torch.ones(num_features, device=device, dtype=dtype))
        self.register_buffer("bias", torch.zeros(num_features, device=device, dtype=dtype))

    def _extra_fields(self):
        return {**super()._extra_fields(), "affine": "fixed"}

