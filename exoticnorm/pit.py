"""PIT norm: normalize each channel through its own CDF (probability integral transform).

y = γ ∘ g(F(x)) + β with g the identity (``output="uniform"``, values in (0, 1)) or the inverse
normal CDF Φ⁻¹ on F clipped to [tail, 1 − tail] (``output="normal"``; the clip bounds the
slope 1/φ in the tails).

Training: F is the batch's CDF on the running sketch's grid (``exoticnorm.sketch``): with
bucket counts giving the batch CDF G_k at the bin edges, a value at position t in bin k maps
to G_k + (t − k)(G_{k+1} − G_k), whose slope is the batch histogram density (non-zero inside
the data, zero in empty bins and outside the data). Ties at the bottom of a bin, such as the
zeros after a ReLU, take their mid-rank G_k + m/(2n) (m tied values out of n). With
``output="normal"`` the map is g(G_k) + (t − k)(g(G_{k+1}) − g(G_k)): exact at every bin edge,
linear in between, so one table lookup per value and no Φ⁻¹ per value. On the CPU one C++
call counts, builds the tables, updates the sketch and transforms, channel by channel
(``exoticnorm/csrc/pit_cpu.cpp``), and the backward is one pass; elsewhere the same math runs
as torch ops. Eval: F is the
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
from einops import rearrange
from torch import Tensor

from . import functional as EF
from .base import InputError, RunningStatsNorm
from .registry import register_norm
from .kernels import pit_cpu
from .sketch import QuantileSketch

__all__ = ["PITNorm"]

_KERNEL_DTYPES = (torch.float32, torch.float64)  # of the sketch's buffers


class _FusedPIT(torch.autograd.Function):
    """The training transform as fused CPU passes (``PITNorm._kernel_forward``: histogram, tables,
    transform); the backward recomputes each value's bin from x. The tables are constants, as
    the bin counts are: the gradient is the transform's local slope."""

    @staticmethod
    def forward(ctx, x3, weight, bias, norm, kernel):
        y, tables = norm._kernel_forward(kernel, x3, weight.detach(), bias.detach())
        ctx.kernel = kernel
        ctx.save_for_backward(x3, weight, *tables)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x3, weight, *tables = ctx.saved_tensors
        gx, gw, gb = ctx.kernel.backward(gy.contiguous(), x3, *tables, weight.detach())
        return gx, gw, gb, None, None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


OUTPUTS = ("normal", "uniform")


@register_norm("pit")
class PITNorm(RunningStatsNorm):
    """PIT norm: y = γ ∘ Φ⁻¹(F(x)) + β (or F(x) with output="uniform"), F from the batch in
    training and from a running quantile sketch in eval."""

    _running_stats: dict = {}
    _convertible_state = ("weight", "bias")
    precise_eval = True
    vmap_training = False

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

    def _batch_sketch(self, x3: Tensor) -> tuple[QuantileSketch, bool]:
        """The sketch whose grid the batch is counted on (a private one without running stats)
        and whether it was fresh; a fresh grid is first set from this batch's moments."""
        sketch = self.sketch if self.track_running_stats else QuantileSketch(
            self.num_features, self.bins, None, device=x3.device)
        fresh = not bool(sketch.ready.all())
        if fresh:
            sketch.follow(x3, dim=1)
        return sketch, fresh

    def _kernel_forward(self, kernel, x3: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, tuple]:
        """y and the tables the backward needs, from the fused CPU passes; updates the sketch
        (the batch is counted on the current grid, then the grid follows the batch's moments)."""
        sketch, fresh = self._batch_sketch(x3)
        observe = self.training and self.track_running_stats
        momentum = -1.0 if sketch.momentum is None else float(sketch.momentum)
        normal = self.output == "normal"
        if not _distributed():  # one C++ call
            y, *tables, regrid, std = kernel.forward(
                x3, sketch.center, sketch.scale, self.bins, normal, self.tail, sketch.cdf, sketch.weight,
                sketch.mean, sketch.var, sketch.ready, momentum, sketch.regrid_shift, observe, not fresh,
                weight, bias)
            sketch.move_grids(regrid, std)
            return y, tuple(tables)
        center, scale = sketch.center.to(x3.dtype, copy=True), sketch.scale.to(x3.dtype, copy=True)
        counts, bottom, ties, moments = kernel.histogram(x3, center, scale, self.bins)
        dist.all_reduce(counts)
        lo, span, tie, atom = kernel.tables(counts, ties, bottom, moments[0], normal, self.tail, sketch.cdf,
                                            sketch.weight, momentum, observe)
        if not fresh:
            sketch.follow_moments(moments)
        tables = (center, scale, lo, span, tie, atom)
        return kernel.apply(x3, *tables, weight, bias), tables

    def _torch_forward(self, x3: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """The same transform as torch ops (CUDA, or no compiler): y = γ (lo_k + span_k (t − k)) + β
        at grid position t in bin k, atom_k for a tie at the bin's bottom; per-bin tables from
        the batch's bin counts."""
        sketch, fresh = self._batch_sketch(x3)
        k, c = self.bins, self.num_features
        # copies: the grid the batch is counted on is the one it is placed on, although the
        # sketch's grid follows this batch's moments before the transform runs
        center, scale = sketch.center.to(x3.dtype, copy=True), sketch.scale.to(x3.dtype, copy=True)
        values = x3.detach()
        z = (x3 - center.view(1, -1, 1)) / scale.view(1, -1, 1)
        t = (z / (1.0 + z.abs()) + 1.0) * (0.5 * k)
        bin_ = torch.nan_to_num(t.detach(), nan=0.0).floor().clamp_(0, k - 1)  # NaN stays NaN via t
        flat = (bin_.long() + torch.arange(c, device=x3.device).view(1, -1, 1) * k).reshape(-1)
        counts = sketch.count_index(flat).double()
        local_n = counts.sum(1, keepdim=True)
        bottom = values.new_full((c * k,), float("inf")).scatter_reduce(0, flat, values.reshape(-1), "amin")
        tie = values.reshape(-1) == bottom[flat]
        ties = torch.zeros_like(bottom).scatter_add_(0, flat, tie.to(x3.dtype)).view(c, k)
        v = values.double()
        moments = torch.stack([torch.full_like(v[0, :, 0], v.numel() // c), v.sum((0, 2)), (v * v).sum((0, 2))])
        if _distributed():
            dist.all_reduce(counts)
        if self.training and self.track_running_stats:
            sketch.observe(counts.to(sketch.cdf.dtype))
        if not fresh:
            sketch.follow_moments(moments)
        counts, ties, local_n = counts.to(x3.dtype), ties.to(x3.dtype), local_n.to(x3.dtype)
        edges = torch.cat([counts.new_zeros(c, 1), counts.cumsum(1)], 1) / counts.sum(1, keepdim=True)
        has_atom = ties > 1
        share = torch.where(has_atom, ties, 0.0) / local_n  # the tied values' part of the batch
        if self.output == "uniform":
            lo, hi, atom = edges[:, :-1] + share, edges[:, 1:], edges[:, :-1] + share / 2
        else:
            ppf = lambda u: torch.special.ndtri(u.clamp(self.tail, 1.0 - self.tail))  # noqa: E731
            nd = ppf(edges)
            lo, hi, atom = nd[:, :-1].clone(), nd[:, 1:], nd[:, :-1].clone()
            where = has_atom.nonzero(as_tuple=True)  # few bins (ReLU zeros): Φ⁻¹ only there
            lo[where] = ppf(edges[:, :-1][where] + share[where])
            atom[where] = ppf(edges[:, :-1][where] + share[where] / 2)
        at = lambda table: table.flatten()[flat].view_as(t)  # noqa: E731
        g = at(lo) + at(hi - lo) * (t - bin_)
        g = torch.where(at(has_atom) & (x3 == bottom[flat].view_as(t)), at(atom), g)
        return g * weight.view(1, -1, 1) + bias.view(1, -1, 1)

    def _train_transform(self, x3: Tensor) -> Tensor:
        """The training transform of x3 (N, C, S): fused on the CPU, torch ops elsewhere."""
        weight = (self.weight if self.affine else x3.new_ones(self.num_features)).to(x3.dtype)
        bias = (self.bias if self.affine else x3.new_zeros(self.num_features)).to(x3.dtype)
        kernel = pit_cpu() if x3.device.type == "cpu" and self.sketch.cdf.dtype in _KERNEL_DTYPES else None
        if kernel is not None:
            return _FusedPIT.apply(x3, weight, bias, self, kernel)
        return self._torch_forward(x3, weight, bias)

    def _normalize(self, x: Tensor) -> Tensor:
        if x.device.type == "meta":  # shapes only: no statistics to read or update
            return EF.affine_normalize(x, None, None, self.weight, self.bias, 0.0)
        self.update_factor()
        dtype = EF.stats_dtype(x)
        with EF.autocast_off(x):
            xs = x.to(dtype)
            if self.uses_batch_stats:
                x3 = rearrange(xs, "n c ... -> n c (...)")
                if x3.shape[2] == 1:  # (N, C): each channel's values made contiguous, as one row
                    y3 = self._train_transform(rearrange(x3, "n c 1 -> 1 c n").contiguous())
                    return rearrange(y3, "1 c n -> n c 1").reshape(xs.shape).to(x.dtype)
                return self._train_transform(x3.contiguous()).view(xs.shape).to(x.dtype)
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
