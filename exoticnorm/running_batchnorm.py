"""fastai's RunningBatchNorm: batch norm for small batches, normalizing with running statistics."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import distributed
from . import functional as EF
from .base import RunningStatsNorm

__all__ = ["RunningBatchNorm"]


class RunningBatchNorm(RunningStatsNorm):
    """Batch norm for small batches: normalize with exponential averages that include this batch.

    Each training batch of B samples, n values per channel, sum s_b and centred sum of squares
    r_b = Σ(x − μ_b)² moves the per-channel sum S ← lerp(S, s_b, m), count c ← lerp(c, n, m) and
    centred sum of squares R ← (1 − m) R + m r_b + w₁w₂/(w₁ + w₂)·(S/c − μ_b)² (w₁ = (1 − m) c,
    w₂ = m n: the exact R of fastai's lerped sums of squares, without their cancellation),
    with the batch-size-dependent momentum m = 1 − (1 − momentum) / sqrt(max(B − 1, 1)). Then
    μ = S / c, σ² = R / c (at least 0.01 until 20 samples were seen), and
    y = (x − μ) / sqrt(σ² + eps) · γ + β, with gradients through this batch's share.
    Eval uses the same statistics without moving them.

    fastai also divides S, Q and c by a debiasing factor; it cancels in S / c and Q / c, so it
    is left out here. ``sqrs`` holds R (state_dict version 2; version-1 dicts, which held the
    raw sum of squares Q = R + S²/c, are converted on load).

    Synced: in training inside an initialized process group of 2+ processes (``process_group``,
    default all), B, n, μ_b and r_b are those of every process's batch together, as for ``bn``.
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
        process_group: Any = None,
    ) -> None:
        if momentum is None:
            raise ValueError("RunningBatchNorm needs a float momentum; it has no cumulative mode")
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.process_group = process_group

    _version = 2
    cumulative = False

    @torch.compiler.disable  # buffers rewritten from this batch's share: eager only
    def _normalize(self, x: Tensor) -> Tensor:
        dtype = EF.stats_dtype(x)
        sums, sqrs, count, samples = (
            t.to(dtype) for t in (self.sums, self.sqrs, self.count, self.samples)
        )
        if self.training:
            self.update_factor()
            mean_b, var_b, n, batch = self._batch_moments(x.to(dtype), sums / count.clamp_min(1e-12))
            m = 1.0 - (1.0 - self.momentum) / math.sqrt(max(batch - 1, 1))
            w1, w2 = (1.0 - m) * count, m * n
            old_mean = torch.where(count > 0, sums / count.clamp_min(1e-12), mean_b)
            sqrs = (1.0 - m) * sqrs + m * n * var_b + w1 * w2 / (w1 + w2) * (old_mean - mean_b) ** 2
            sums = torch.lerp(sums, n * mean_b, m)
            count = torch.lerp(count, count.new_tensor(n), m)
            samples = samples + batch
            with torch.no_grad():
                for buffer, value in zip(
                    (self.sums, self.sqrs, self.count, self.samples), (sums, sqrs, count, samples)
                ):
                    buffer.copy_(value)
        seen = count > 0
        mean = torch.where(seen, sums / count.clamp_min(1e-12), 0.0)
        var = torch.where(seen, (sqrs / count.clamp_min(1e-12)).clamp_min(0.0), 1.0)
        var = torch.where(samples < self.min_samples, var.clamp_min(self.min_var), var)
        return EF.affine_normalize(x, mean, var, self.weight, self.bias, self.eps)

    def _batch_moments(self, x: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, float, float]:
        """μ_b, the biased σ²_b, the values per channel n and the samples B of this batch (of every
        process's batch when synced, summed around ``shift``, the running mean)."""
        if not distributed.synced(self.process_group):
            var_b, mean_b = torch.var_mean(x, dim=EF.channel_dims(x), correction=0)
            return mean_b, var_b, float(EF.values_per_channel(x)), float(x.shape[0])
        mean_b, var_b, count = distributed.synced_moments(x, shift, self.process_group)
        n = count.item()
        return mean_b, var_b, n, n * x.shape[0] / EF.values_per_channel(x)

    @torch.no_grad()
    def eval_affine(self) -> tuple[Tensor, Tensor]:
        """The eval transform as y = A x + b on (C,) vectors (A diagonal)."""
        seen = self.count > 0
        mean = torch.where(seen, self.sums / self.count.clamp_min(1e-12), 0.0)
        var = torch.where(seen, (self.sqrs / self.count.clamp_min(1e-12)).clamp_min(0.0), 1.0)
        var = torch.where(self.samples < self.min_samples, var.clamp_min(self.min_var), var)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -scale * mean + (self.bias if self.bias is not None else 0.0)
        return torch.diag(scale), shift

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        keys = [prefix + k for k in ("sums", "sqrs", "count")]
        if version is not None and version < 2 and all(k in state_dict for k in keys):
            sums, sqrs, count = (state_dict[k] for k in keys)  # Q → R = Q − S²/c
            state_dict[keys[1]] = torch.where(count > 0, sqrs - sums * sums / count.clamp_min(1e-12), sqrs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
