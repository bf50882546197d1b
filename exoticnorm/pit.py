"""PIT norm: normalize each channel through its own CDF (probability integral transform).

y = γ ∘ g(F(x)) + β with g the identity (``output="uniform"``, values in (0, 1)) or the inverse
normal CDF Φ⁻¹ on F clipped to [tail, 1 − tail] (``output="normal"``; the clip bounds the
slope 1/φ in the tails).

Training: F is the batch's CDF on the running sketch's grid (``exoticnorm.sketch``): with
bucket counts giving the batch CDF G_k at the bin edges, a value at position t in bin k maps
to G_k + (t − k)(G_{k+1} − G_k), whose slope is the batch histogram density (non-zero inside
the data, zero in empty bins and outside the data). Ties at the bottom of a bin, such as the
zeros after a ReLU, take their mid-rank G_k + m/(2n) (m tied values out of n). Eval: F is the
running sketch mixed with a little of the grid's own heavy-tailed shape,
F = (1 − 2ε) F_sketch + 2ε·u_grid with ε = 1/(n + 2) after n values (the mass the sketch
cannot have seen), so values beyond anything seen still map in order (graded, unclipped
tails) while values inside the data move by at most 2ε.

Published precedent: Ness et al., "CDF Normalization" (2021) found Gaussianizing activations
ineffective; this layer exists to test that.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as EF
from .base import InputError, RunningStatsNorm
from .registry import register_norm
from .sketch import QuantileSketch

__all__ = ["PITNorm"]

OUTPUTS = ("normal", "uniform")


@register_norm("pit")
class PITNorm(RunningStatsNorm):
    """PIT norm: y = γ ∘ Φ⁻¹(F(x)) + β (or F(x) with output="uniform"), F from the batch in
    training and from a running quantile sketch in eval."""

    _running_stats: dict = {}
    _convertible_state = ("weight", "bias")
    precise_eval = True

    def __init__(self, num_features: int, output: str = "normal", momentum: float | None = 0.1,
                 bins: int = 500, tail: float = 1e-3, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, 0.0, momentum, affine, track_running_stats, device, dtype)
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if not 0.0 < tail < 0.5:
            raise ValueError(f"tail must be in (0, 0.5), got {tail!r}")
        self.output, self.tail, self.bins = output, float(tail), bins
        # The sketch is the running statistic; without tracking, a private one sets the grid.
        self.sketch = QuantileSketch(num_features, bins, momentum, device=device)
        if not track_running_stats:
            self.sketch.requires_grad_(False)

    @property
    def momentum(self) -> float | None:
        return self._momentum

    @momentum.setter
    def momentum(self, value: float | None) -> None:  # the sketch forgets at the same rate
        self._momentum = value
        if "sketch" in self._modules:
            self.sketch.momentum = value

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if hasattr(self, "sketch"):
            self.sketch.reset()

    def _batch_cdf(self, x: Tensor) -> Tensor:
        sketch = self.sketch if self.track_running_stats else QuantileSketch(
            self.num_features, self.bins, None, device=x.device)
        sketch.follow(x, dim=1)
        t = sketch.position(x, dim=1)
        flat = sketch.bin_index(t, dim=1)
        k = self.bins
        counts = sketch.count_index(flat).to(t.dtype)
        local_counts = counts
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            counts = counts.clone()
            dist.all_reduce(counts)
        if self.training and self.track_running_stats:
            sketch.observe(counts)
        n = counts.sum(1, keepdim=True)
        edges = torch.cat([counts.new_zeros(self.num_features, 1), counts.cumsum(1)], 1) / n
        # ties at the bottom of a bin (an atom, e.g. ReLU zeros) take their mid-rank; the rest
        # of the bin is linear in t above the atom's mass
        bins = flat.reshape(-1)
        values = x.detach().reshape(-1).to(t.dtype)
        bottom = torch.full((self.num_features * k,), float("inf"), device=x.device, dtype=t.dtype)
        bottom = bottom.scatter_reduce(0, bins, values, "amin", include_self=True)
        at_bottom = values == bottom[bins]
        tied = torch.zeros_like(bottom).scatter_add_(0, bins, at_bottom.to(t.dtype))
        atom_share = torch.where(tied > 1, tied, 0.0)[bins] / local_counts.sum(1)[bins // k]
        row = bins + bins // k  # edges has k + 1 entries per channel
        g_lo = edges.flatten()[row] + atom_share
        g_hi = edges.flatten()[row + 1]
        frac = t.reshape(-1) - (bins % k).to(t.dtype)
        u = g_lo + frac * (g_hi - g_lo)
        u = torch.where(at_bottom & (atom_share > 0), g_lo - atom_share / 2, u)
        return u.view(t.shape)

    def _normalize(self, x: Tensor) -> Tensor:
        if self.uses_batch_stats and EF.values_per_channel(x) <= 1:
            raise InputError(
                f"PITNorm got 1 value per channel in training (input shape {tuple(x.shape)}); "
                "a CDF needs a batch of at least 2 values per channel, or call .eval()"
            )
        self.update_factor()
        dtype = EF.stats_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xs = x.to(dtype)
            if self.uses_batch_stats:
                u = self._batch_cdf(xs)
                if self.output == "normal":
                    u = u.clamp(self.tail, 1.0 - self.tail)
            else:
                t = self.sketch.position(xs, dim=1)
                f = QuantileSketch.interpolate(self.sketch.cdf, t.movedim(1, 0)).movedim(0, 1)
                eps = (1.0 / (self.sketch.weight + 2.0)).to(dtype).view(1, -1, *[1] * (x.ndim - 2))
                u = (1.0 - 2.0 * eps) * f + (2.0 * eps / self.bins) * t
                u = u.clamp(1e-12, 1.0 - 1e-12)
            y = torch.special.ndtri(u) if self.output == "normal" else u
            y = EF.affine_normalize(y, None, None, self.weight, self.bias, 0.0)
        return y.to(x.dtype)

    def _extra_fields(self) -> dict[str, Any]:
        return {"output": self.output, "bins": self.bins, "momentum": self.momentum,
                "track_running_stats": self.track_running_stats}
