"""Batch normalization and its d2l variants: lite (mean-only, variance-only) and fixed affine."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

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
    """

    _center = True
    _scale = True
    _convertible_state = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def _normalize(self, x: Tensor) -> Tensor:
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
    ) -> None:
        super().__init__(num_features, eps, momentum, False, track_running_stats, device, dtype)
        del self.weight, self.bias
        self.register_buffer("weight", torch.ones(num_features, device=device, dtype=dtype))
        self.register_buffer("bias", torch.zeros(num_features, device=device, dtype=dtype))

    def _extra_fields(self):
        return {**super()._extra_fields(), "affine": "fixed"}

