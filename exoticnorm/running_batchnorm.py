"""fastai's RunningBatchNorm: batch norm for small batches, normalizing with running statistics."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import functional as EF
from .base import RunningStatsNorm
from .registry import register_norm

__all__ = ["RunningBatchNorm"]


@register_norm("running-bn")
class RunningBatchNorm(RunningStatsNorm):
    """Batch norm for small batches: normalize with exponential averages that include this batch.

    Each training batch of B samples and n values per channel moves the per-channel sums
    S ← lerp(S, Σx, m), Q ← lerp(Q, Σx², m) and the count c ← lerp(c, n, m), with the
    batch-size-dependent momentum m = 1 − (1 − momentum) / sqrt(max(B − 1, 1)). Then
    μ = S / c, σ² = Q / c − μ² (at least 0.01 until 20 samples were seen), and
    y = (x − μ) / sqrt(σ² + eps) · γ + β, with gradients through this batch's share.
    Eval uses the same statistics without moving them.

    fastai also divides S, Q and c by a debiasing factor; it cancels in S / c and Q / c, so it
    is left out here.
    """

    _running_stats = {
        "sums": (0.0, True),
        "sqrs": (0.0, True),
        "count": (0.0, False),
        "samples": (0.0, False),
    }
    _convertible_state = ("weight", "bias")
    min_samples = 20
    min_var = 0.01

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if momentum is None:
            raise ValueError("RunningBatchNorm needs a float momentum; it has no cumulative mode")
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)

    def _normalize(self, x: Tensor) -> Tensor:
        dtype = EF.stats_dtype(x)
        sums, sqrs, count, samples = (
            t.to(dtype) for t in (self.sums, self.sqrs, self.count, self.samples)
        )
        if self.training:
            self.update_factor()
            m = 1.0 - (1.0 - self.momentum) / math.sqrt(max(x.shape[0] - 1, 1))
            xs = x.to(dtype)
            dims = EF.channel_dims(x)
            sums = torch.lerp(sums, xs.sum(dims), m)
            sqrs = torch.lerp(sqrs, (xs * xs).sum(dims), m)
            count = torch.lerp(count, count.new_tensor(float(EF.values_per_channel(x))), m)
            samples = samples + x.shape[0]
            with torch.no_grad():
                for buffer, value in zip(
                    (self.sums, self.sqrs, self.count, self.samples), (sums, sqrs, count, samples)
                ):
                    buffer.copy_(value)
        seen = count > 0
        mean = torch.where(seen, sums / count.clamp_min(1e-12), 0.0)
        var = torch.where(seen, (sqrs / count.clamp_min(1e-12) - mean * mean).clamp_min(0.0), 1.0)
        var = torch.where(samples < self.min_samples, var.clamp_min(self.min_var), var)
        return EF.affine_normalize(x, mean, var, self.weight, self.bias, self.eps)
