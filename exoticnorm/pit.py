"""PIT norm: normalize each channel through its own CDF (probability integral transform).

y = γ ∘ g(F(x)) + β with g the identity (``output="uniform"``, values in (0, 1)) or the inverse
normal CDF Φ⁻¹ on F clipped to [tail, 1 − tail] (``output="normal"``).

Training: F is the batch's CDF on the running sketch's grid (``exoticnorm.sketch``), piecewise
linear over pieces of about ``smoothing`` values, so its slope (the gradient) stays bounded for
channels with few values; ties (ReLU zeros) take their mid-rank. Eval: F from the running
sketch, with graded tails. The math is in ``exoticnorm.cdf``; on the CPU one C++ call counts,
builds the tables, updates the sketch and transforms, channel by channel
(``exoticnorm/csrc/pit_cpu.cpp``); elsewhere the same math runs as torch ops. This module keeps
the bookkeeping: the sketch, momentum, train/eval, processes.

Published precedent: Ness et al., "CDF Normalization" (2021) found Gaussianizing activations
ineffective; this layer exists to test that.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor

from .distributed import synced
from . import cdf
from . import functional as EF
from .base import RunningStatsNorm
from .kernels import pit_cpu
from .sketch import QuantileSketch

__all__ = ["PITNorm"]

_KERNEL_DTYPES = (torch.float32, torch.float64)  # of the sketch's buffers



def _union_bins(bottom: Tensor, ties: Tensor) -> tuple[Tensor, Tensor]:
    """Each bin's smallest value over all ranks and the ranks' ties at exactly that value, so
    that the tables (and the ties' mid-ranks) are those of the concatenated batch."""
    lowest = bottom.clone()
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    total = torch.where(bottom.view_as(ties) == lowest.view_as(ties), ties, 0.0)
    dist.all_reduce(total)
    return lowest, total


OUTPUTS = ("normal", "uniform")


class PITNorm(RunningStatsNorm):
    """PIT norm: y = γ ∘ Φ⁻¹(F(x)) + β (or F(x) with output="uniform"), F from the batch in
    training and from a running quantile sketch in eval."""

    _running_stats: dict = {}
    _convertible_state = ("weight", "bias")
    precise_eval = True
    vmap_training = False

    def __init__(self, num_features: int, output: str = "normal", momentum: float | None = 0.1,
                 bins: int = 500, tail: float = 1e-3, smoothing: float = 8.0, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, 0.0, momentum, affine, track_running_stats, device, dtype)
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if not 0.0 < tail < 0.5:
            raise ValueError(f"tail must be in (0, 0.5), got {tail!r}")
        if not (isinstance(smoothing, (int, float)) and not isinstance(smoothing, bool)
                and 0 <= smoothing < float("inf")):
            raise ValueError(f"smoothing must be a finite number >= 0 (values per linear piece of "
                             f"the training transform; 0 = one piece per bin), got {smoothing!r}")
        self.output, self.tail, self.bins, self.smoothing = output, float(tail), bins, float(smoothing)
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

    def _batch_sketch(self, x: Tensor) -> tuple[QuantileSketch, bool]:
        """The sketch whose grid the batch is counted on (a private one without running stats)
        and whether it was fresh; a fresh grid is first set from this batch's moments (x: (N, C, *))."""
        sketch = self.sketch if self.track_running_stats else QuantileSketch(
            self.num_features, self.bins, None, device=x.device)
        fresh = not bool(sketch.ready.all())
        if fresh:
            sketch.follow(x, dim=1)
        return sketch, fresh

    def _kernel_step(self, kernel, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """The single-process training transform of x (N, C, *) as one C++ autograd Function:
        counts, tables, the sketch's update (the batch is counted on the current grid, then the
        grid follows the batch's moments and moves where it drifted) and y."""
        sketch, fresh = self._batch_sketch(x)
        return self._step_call(kernel, x, weight, bias, sketch, None, not fresh, False)

    def _step_call(self, kernel, x: Tensor, weight: Tensor, bias: Tensor, sketch: QuantileSketch,
                   counter: Tensor | None, follow: bool, if_ready: bool) -> Tensor | None:
        """``kernel.step`` on the sketch's buffers (``counter``: num_batches_tracked, counted by the
        call; None when counted already). With ``if_ready``, None (nothing done) while a grid is unset."""
        b = sketch._buffers  # a dict read per buffer: a Module attribute read costs far more in place
        momentum = -1.0 if sketch.momentum is None else float(sketch.momentum)
        return kernel.step(
            x, weight, bias, b["center"], b["scale"], b["cdf"], b["weight"], b["mean"], b["var"], b["ready"],
            b["nonfinite"], b["atom"], b["atom_mass"], counter, self.bins, self.output == "normal", self.tail,
            self.smoothing, momentum, sketch.regrid_shift, self.training and self.track_running_stats, follow,
            if_ready)

    _lean_covers = ("check_input", "_check_batch", "uses_batch_stats", "update_factor", "_normalize",
                    "_train_transform", "_kernel_step", "_batch_sketch")

    def _fast_train_step(self, x: Tensor) -> Tensor | None:
        """The CPU kernel's step (``Norm._lean_covers``; 40-60 µs less per forward than the full
        one, measured) for a single process, eager, float32/float64 CPU input of 2+ values per
        channel, the affine in x's dtype and a tracked sketch with every grid set; the C++ call
        counts the batch."""
        if torch.compiler.is_compiling() or not (
                type(x) is Tensor and x.is_cpu and x.dtype in _KERNEL_DTYPES and 2 <= x.ndim <= 5
                and self.track_running_stats and self.affine):
            return None
        channels = x.shape[1]
        weight, bias, sketch = self.weight, self.bias, self.sketch
        cdf = sketch.cdf
        if (channels != self.num_features or x.numel() < 2 * channels or weight.dtype != x.dtype
                or not weight.is_cpu or not cdf.is_cpu or cdf.dtype not in _KERNEL_DTYPES
                or torch._C._functorch.is_functorch_wrapped_tensor(x) or synced()):
            return None
        kernel = pit_cpu()
        if kernel is None:
            return None
        return self._step_call(kernel, x, weight, bias, sketch, self._buffers["num_batches_tracked"], True, True)

    def _kernel_forward(self, x3: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """The training transform by the CPU kernel's steps one at a time, the bin counts summed
        over processes in between (x3's channels as rows)."""
        sketch, fresh = self._batch_sketch(x3)
        observe = self.training and self.track_running_stats
        momentum = -1.0 if sketch.momentum is None else float(sketch.momentum)
        normal = self.output == "normal"
        kernel = pit_cpu()
        center, scale = sketch.center.to(x3.dtype, copy=True), sketch.scale.to(x3.dtype, copy=True)
        counts, bottom, ties, moments = kernel.histogram(x3, center, scale, self.bins)
        bottom, ties = _union_bins(bottom, ties)
        dist.all_reduce(counts)
        n = counts.sum(1)
        lo, span, tie, atom, slope = kernel.tables(counts, ties, bottom, n, normal, self.tail,
                                                   self.smoothing, sketch.cdf, sketch.weight, momentum, observe)
        if observe:
            sketch.observe_atoms(*cdf.largest_ties(bottom, ties), n)
        if not fresh:
            sketch.follow_moments(moments)
        return cdf.TableTransform.apply(x3, weight, bias, center, scale, lo, span, tie, atom, slope)

    def _torch_forward(self, x3: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """The same transform as torch ops (CUDA, or no compiler): ``exoticnorm.cdf``."""
        sketch, fresh = self._batch_sketch(x3)
        # copies: the grid the batch is counted on is the one it is placed on, although the
        # sketch's grid follows this batch's moments before the transform runs
        center, scale = sketch.center.to(x3.dtype, copy=True), sketch.scale.to(x3.dtype, copy=True)
        z = (x3 - center.view(1, -1, 1)) / scale.view(1, -1, 1)
        t = (z / (1.0 + z.abs()) + 1.0) * (0.5 * self.bins)
        flat, counts, bottom, ties, moments = cdf.batch_counts(x3, t, self.bins, center)
        if synced():
            bottom, ties = _union_bins(bottom, ties)
            dist.all_reduce(counts)
        n = counts.sum(1, keepdim=True)
        if self.training and self.track_running_stats:
            sketch.observe(counts.to(sketch.cdf.dtype))
            sketch.nonfinite.add_((x3.shape[0] * x3.shape[2] - moments[0]).to(sketch.nonfinite.dtype))
            sketch.observe_atoms(*cdf.largest_ties(bottom, ties), n.squeeze(1))
        if not fresh:
            sketch.follow_moments(moments)
        tables = cdf.batch_tables(counts.to(x3.dtype), ties.to(x3.dtype), n.to(x3.dtype),
                                  self.output, self.tail, self.smoothing)
        return cdf.apply_tables(x3, t, flat, bottom, tables, weight, bias)

    def _train_transform(self, x: Tensor) -> Tensor:
        """The training transform of x (N, C, *): fused on the CPU, torch ops elsewhere, on x as
        (N, C, S). The passes want each channel's values contiguous: (N, C) input (S = 1) is
        transposed into one row per channel, by the single-process C++ step itself, else here."""
        if self.affine:
            weight, bias = self.weight, self.bias
            if weight.dtype != x.dtype:
                weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        else:
            weight, bias = x.new_ones(self.num_features), x.new_zeros(self.num_features)
        kernel = pit_cpu() if x.device.type == "cpu" and self.sketch.cdf.dtype in _KERNEL_DTYPES else None
        if kernel is not None and not synced():
            return self._kernel_step(kernel, x, weight, bias)
        x3 = (x.flatten(2) if x.ndim > 2 else x.unsqueeze(2)).contiguous()  # (N, C, S)
        columns = x3.shape[2] == 1
        if columns:
            x3 = rearrange(x3, "n c 1 -> 1 c n").contiguous()
        y3 = (self._kernel_forward if kernel is not None else self._torch_forward)(x3, weight, bias)
        return (rearrange(y3, "1 c n -> n c 1") if columns else y3).reshape(x.shape)

    @torch.compiler.disable
    def _eager_train_transform(self, x: Tensor) -> Tensor:
        """``_train_transform`` as a graph break under torch.compile (data-dependent tables and a
        C++ kernel run eagerly). (Eager calls skip this wrapper's few µs.)"""
        return self._train_transform(x)

    def _normalize(self, x: Tensor) -> Tensor:
        if x.device.type == "meta":  # shapes only: no statistics to read or update
            return EF.affine_normalize(x, None, None, self.weight, self.bias, 0.0)
        self.update_factor()
        dtype = EF.stats_dtype(x)
        with EF.autocast_off(x):
            xs = x.to(dtype)
            if self.uses_batch_stats:
                train = self._eager_train_transform if torch.compiler.is_compiling() else self._train_transform
                return train(xs).to(x.dtype)
            xc = xs.movedim(1, 0)  # channels first
            t = self.sketch.position(xc)
            f = self.sketch.cdf_at(xc, t)
            u = cdf.eval_cdf(f.to(dtype), t, self.sketch.weight, self.bins).movedim(0, 1)
            y = torch.special.ndtri(u) if self.output == "normal" else u
            y = EF.affine_normalize(y, None, None, self.weight, self.bias, 0.0)
        return y.to(x.dtype)

    def _extra_fields(self) -> dict[str, Any]:
        return {"output": self.output, "bins": self.bins, "smoothing": self.smoothing,
                "momentum": self.momentum,
                "track_running_stats": self.track_running_stats}
