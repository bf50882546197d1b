"""The PIT norm's math as functions of tensors: the batch's training transform and the eval map.

A channel's values sit on a grid of K bins at positions t = K·u(x) (``QuantileSketch.position``).

Training: from the batch's bin counts, G_j = (values below edge j)/n at the K + 1 edges. The
transform maps the edges through g (the identity for uniform output, Φ⁻¹ on G clipped to
[tail, 1 − tail] for normal output) and is linear in t between them: exact at every edge.
Ties at a bin's bottom (ReLU zeros) take their mid-rank g(G + m/2n), and the bin's other
values start after them, at g(G + m/n).

Backward: the exact derivative of that map is a histogram density over single bins; where a
channel has few values (n < s·K, fc layers, late ResNet stages at small batches) bins hold one
or two values, and the slope spikes and grows like K/n (32 values of N(0, σ²) on 500 bins gave
gradients up to 55/σ; the slope of the ideal map is 1/σ, and a PIT-resnet18 diverged to
non-finite values in a few steps). The gradient is therefore the derivative of the same
construction on pieces of r bins,

    r = ⌈s·K / n⌉ clamped to [1, K]   (s = ``smoothing``, values per piece on average),

with knots also at tied bins: a histogram density over pieces of about s values, bounded
(at most 3.2/σ in that example). Channels with n ≥ s·K (LeNet's conv layers) get the exact
derivative; the others get a smoothed-CDF gradient that is not the forward's derivative
(``smoothing=0``: always exact).

Eval: F from the running sketch, mixed with 2ε of the grid's own heavy-tailed shape,
F = (1 − 2ε) F_sketch + 2ε·u, ε = 1/(n + 2) after n values, so values beyond anything seen
still map in order.

The CPU kernel (``exoticnorm/csrc/pit_cpu.cpp``) computes the same tables; tests hold the two
to 1e-10 in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import refuse_double_backward
from .kernels import pit_cpu

__all__ = ["coarsening", "output_map", "batch_counts", "largest_ties", "batch_tables", "apply_tables", "eval_cdf",
           "TableTransform"]


def coarsening(n: Tensor, bins: int, smoothing: float) -> Tensor:
    """r = ⌈smoothing·K/n⌉ in [1, K] per channel (n: finite values per channel, (C, 1))."""
    if smoothing <= 0:
        return torch.ones_like(n, dtype=torch.long)
    r = torch.ceil(smoothing * bins / n.clamp_min(1e-300))
    return torch.nan_to_num(r, nan=1.0, posinf=float(bins)).clamp(1, bins).long()


def output_map(output: str, tail: float):
    """g: the identity for "uniform", Φ⁻¹(clamp(u, tail, 1 − tail)) for "normal"."""
    if output == "uniform":
        return lambda u: u
    return lambda u: torch.special.ndtri(u.clamp(tail, 1.0 - tail))


def batch_counts(x3: Tensor, t: Tensor, bins: int, center: Tensor) -> tuple[Tensor, ...]:
    """From x3 (N, C, S) at grid positions t: bin indices (flat c·K + k), bin counts (C, K),
    each bin's smallest value, the ties at it (C, K), and the moments (3, C) in float64: count,
    sum and sum of squares, over finite values only (shifted by the grid's ``center``, so far
    off-centre values neither overflow nor cancel)."""
    c = x3.shape[1]
    finite = t == t  # non-finite values have NaN positions
    bin_ = torch.nan_to_num(t.detach(), nan=0.0).floor().clamp_(0, bins - 1).long()
    flat = (bin_ + torch.arange(c, device=x3.device).view(1, -1, 1) * bins).reshape(-1)
    values = x3.detach()
    counts = torch.bincount(flat, weights=finite.reshape(-1).double(), minlength=c * bins).view(c, bins)
    inf = values.new_full((), float("inf"))
    bottom = values.new_full((c * bins,), float("inf")).scatter_reduce(
        0, flat, torch.where(finite, values, inf).reshape(-1), "amin")
    tie = (values.reshape(-1) == bottom[flat]) & finite.reshape(-1)
    ties = torch.zeros(c * bins, dtype=torch.float64, device=x3.device).scatter_add_(0, flat, tie.double())
    d = torch.where(finite, values - center.view(1, -1, 1), 0.0).double()
    n = finite.sum((0, 2)).double()
    s1, s2 = d.sum((0, 2)), (d * d).sum((0, 2))
    c0 = center.double()
    moments = torch.stack([n, s1 + n * c0, s2 + 2 * c0 * s1 + n * c0 * c0])
    return flat, counts, bottom, ties.view(c, bins), moments


def largest_ties(bottom: Tensor, ties: Tensor) -> tuple[Tensor, Tensor]:
    """Per channel, the value and size of its largest tie (NaN, 0 without ties) from each bin's
    bottom (C·K,) or (C, K) and its ties (C, K)."""
    size, k = ties.max(1)
    value = bottom.view(ties.shape).gather(1, k.unsqueeze(1)).squeeze(1).double()
    has = size > 1
    return torch.where(has, value, float("nan")), torch.where(has, size, 0.0).double()


def _pieces(at_edges: Tensor, start_tied: Tensor, has_atom: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Per bin, the piecewise-linear map's value at the bin's bottom and its rise across the bin,
    with knots at every r-th edge and at tied bins (value g(G) there, after the ties for a
    tied bin; ``start_tied`` holds that)."""
    c, k = has_atom.shape
    idx = torch.arange(k, device=has_atom.device).expand(c, k)
    knot = (idx % r == 0) | has_atom
    p = torch.where(knot, idx, 0).cummax(1).values
    knot_above = torch.cat([knot[:, 1:], knot.new_ones(c, 1)], 1)  # knot at edge j + 1
    q = torch.where(knot_above, idx + 1, k).flip(1).cummin(1).values.flip(1)
    start = torch.where(has_atom, start_tied, at_edges[:, :-1]).gather(1, p)
    rise = (at_edges.gather(1, q) - start) / (q - p)
    return start + (idx - p) * rise, rise


def batch_tables(counts: Tensor, ties: Tensor, n: Tensor, output: str, tail: float,
                 smoothing: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-bin tables (C, K) of the training transform (module docstring): lo (output at the
    bin's bottom, after any ties there), span (its rise across the bin), atom (the ties'
    output), whether the bin has ties, and slope (the backward's rise across the bin, from
    pieces of about ``smoothing`` values). ``counts``, ``ties`` (at each bin's smallest value)
    and ``n`` (C, 1) are those of the whole batch, summed over processes."""
    c, k = counts.shape
    g = output_map(output, tail)
    n = counts.sum(1, keepdim=True)
    edges = torch.cat([counts.new_zeros(c, 1), counts.cumsum(1)], 1) / n
    at_edges = g(edges)
    has_atom = ties > 1
    share = torch.where(has_atom, ties, 0.0) / n
    below = edges[:, :-1]
    start_tied = g(below + share)
    lo, span = _pieces(at_edges, start_tied, has_atom, torch.ones_like(n, dtype=torch.long))
    _, slope = _pieces(at_edges, start_tied, has_atom, coarsening(n, k, smoothing))
    atom = torch.where(has_atom, g(below + share / 2), lo)
    return lo, span, atom, has_atom, slope


def apply_tables(x3: Tensor, t: Tensor, flat: Tensor, bottom: Tensor, tables: tuple[Tensor, ...],
                 weight: Tensor, bias: Tensor) -> Tensor:
    """y = γ (lo_k + span_k (t − k)) + β at position t in bin k (γ·atom_k + β for a tie), with
    the gradient slope_k·dt/dx in x."""
    lo, span, atom, has_atom, slope = tables
    at = lambda table: table.flatten()[flat].view_as(t)  # noqa: E731
    bin_ = (flat % lo.shape[1]).view_as(t).to(t.dtype)
    fixed = t.detach()
    g = at(lo) + at(span) * (fixed - bin_) + at(slope) * (t - fixed)  # value: span; gradient: slope
    g = torch.where(at(has_atom) & (x3 == bottom[flat].view_as(t)), at(atom), g)
    return g * weight.view(1, -1, 1) + bias.view(1, -1, 1)


def eval_cdf(f: Tensor, t: Tensor, seen: Tensor, bins: int) -> Tensor:
    """F for eval: the sketch's F(x) (C, …) at grid positions t, mixed with 2ε of the grid's
    shape, ε = 1/(seen + 2); clamped to [1e-12, 1 − 1e-12]."""
    eps = (1.0 / (seen + 2.0)).to(t.dtype).view(-1, *[1] * (t.ndim - 1))
    return ((1.0 - 2.0 * eps) * f + (2.0 * eps / bins) * t).clamp(1e-12, 1.0 - 1e-12)


class TableTransform(torch.autograd.Function):
    """y from tables already built (the distributed path: counts summed over ranks first). The
    tables are constants (as the bin counts are), so the gradient is the transform's local
    slope. Once differentiable: a double backward raises."""

    @staticmethod
    def forward(ctx, x3, weight, bias, center, scale, lo, span, tie, atom, slope):
        ctx.save_for_backward(x3, weight, center, scale, lo, span, tie, atom, slope)
        return pit_cpu().apply(x3, center, scale, lo, span, tie, atom, slope, weight, bias)

    @staticmethod
    def backward(ctx, gy: Tensor, *_):
        refuse_double_backward("the PIT norm's CPU kernel is",
                               "set EXOTICNORM_NO_KERNELS=1 to use the torch-ops path, which is")
        x3, weight, *tables = ctx.saved_tensors
        gx, gw, gb = pit_cpu().backward(gy.contiguous(), x3, *tables, weight)
        return gx, gw, gb, *[None] * 7
