"""A running CDF sketch per channel, in torch: fixed memory, vectorised, forgetting, mergeable.

Each channel keeps a grid of K bins in a squashed coordinate u = ½ (1 + z / (1 + |z|)) ∈ (0, 1),
z = (x − c)/s (centre c, scale s), and the CDF at the K − 1 inner bin edges u_k = k/K. Bucketing
a value is arithmetic (no search), so an update is a few elementwise passes and one bincount.
Between edges the CDF is linear in u; du/dz = ½ (1 + |z|)^(-2) gives bins that widen like a
heavy (1/z²) tail, so lognormal-like tails keep resolution. Beyond the data the CDF is 0 or 1
(``PITNorm`` grades its eval tails on top of this).

Updates: the batch's CDF at the edges (exact, from bucket counts) is averaged in, either with
``momentum`` m, F ← (1 − m) F + m·F_batch (forgets, tracks drift), or cumulatively
(``momentum=None``): F ← (W F + n F_batch)/(W + n), which makes F the exact pooled CDF of
everything seen at every edge while the grid stays. The grid is set from the first batch's
mean and std and follows the running moments (exponential with a momentum, pooled over
everything seen without); the CDF is re-interpolated onto a new grid when the centre moves by
more than ``regrid_shift`` scales or the scale changes by more than that fraction (in the
cumulative mode: when the data leave the grid, e.g. a scale change by orders of magnitude).

Atoms: each channel also keeps its largest tie (``atom``, e.g. the zeros after a ReLU) and the
share of the values at it (``atom_mass``, averaged like the CDF; 0: no atom). ``cdf_at`` gives a value
equal to the atom its mid-rank F(a−) + m/2, and values above it in its bin start from
F(a−) + m: the convention of PITNorm's training transform, so train and eval agree on ties.

Non-finite values (NaN, ±inf) are left out of every statistic and counted per channel in
``nonfinite``; a batch without finite values changes nothing else. The state is float32 or
float64: ``.half()``/``.bfloat16()`` on a model leave a sketch in float32. Sketches on the same grid merge exactly (counts add); inside a process group the
counts and moments of all ranks are summed before the update, so every rank holds the sketch
of the union.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .distributed import synced
from . import cdf as _cdf
from .kernels import pit_cpu

__all__ = ["QuantileSketch"]



_LOW_PRECISION = (torch.float16, torch.bfloat16)


class QuantileSketch(nn.Module):
    """Running CDF of ``num_channels`` streams on ``bins`` bins each (2 KB per channel at 500).

    ``update(x)`` takes values as (C, n); ``cdf_at(x)`` and ``quantile(p)`` evaluate the sketch.
    """

    _version = 2  # 2: ``nonfinite``, ``atom``, ``atom_mass`` added

    def __init__(self, num_channels: int, bins: int = 500, momentum: float | None = None,
                 regrid_shift: float = 0.25, device=None, dtype=None) -> None:
        super().__init__()
        if bins < 2:
            raise ValueError(f"bins must be at least 2, got {bins}")
        if momentum is not None and not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1] or None (cumulative), got {momentum!r}")
        self.num_channels, self.bins, self.momentum = num_channels, bins, momentum
        self.regrid_shift = regrid_shift
        if dtype in _LOW_PRECISION:
            dtype = torch.float32  # 499 CDF values per channel need more than 8 bits of mantissa
        kw = {"device": device, "dtype": dtype or torch.float32}
        self.register_buffer("center", torch.zeros(num_channels, **kw))
        self.register_buffer("scale", torch.ones(num_channels, **kw))
        self.register_buffer("cdf", torch.zeros(num_channels, bins - 1, **kw))
        self.register_buffer("weight", torch.zeros(num_channels, **kw))
        self.register_buffer("mean", torch.zeros(num_channels, **kw))
        self.register_buffer("var", torch.ones(num_channels, **kw))
        self.register_buffer("ready", torch.zeros(num_channels, dtype=torch.bool, device=device))
        self.register_buffer("nonfinite", torch.zeros(num_channels, **kw))
        self.register_buffer("atom", torch.zeros(num_channels, **kw))
        self.register_buffer("atom_mass", torch.zeros(num_channels, **kw))
        self.reset()

    def _apply(self, fn, recurse=True):
        """As nn.Module's, except that float16/bfloat16 conversions leave the state in its own
        dtype (only the device moves)."""
        def keep_precision(t: Tensor) -> Tensor:
            out = fn(t)
            if out.dtype in _LOW_PRECISION and t.is_floating_point() and t.dtype not in _LOW_PRECISION:
                return t.to(device=out.device)
            return out
        return super()._apply(keep_precision, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            for name, fill in (("nonfinite", 0.0), ("atom", 0.0), ("atom_mass", 0.0)):
                state_dict.setdefault(prefix + name, torch.full_like(getattr(self, name), fill))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for name, buffer in self._buffers.items():  # the CPU kernel updates them in place as dense arrays
            if buffer is not None and not buffer.is_contiguous():  # (load_state_dict(assign=True) of views)
                self._buffers[name] = buffer.contiguous()

    def reset(self) -> None:
        self.nonfinite.zero_(), self.atom.zero_(), self.atom_mass.zero_()
        self.center.zero_(), self.scale.fill_(1.0), self.weight.zero_()
        self.mean.zero_(), self.var.fill_(1.0), self.ready.zero_()
        self.cdf.copy_(torch.arange(1, self.bins, dtype=self.cdf.dtype) / self.bins)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, bins={self.bins}, momentum={self.momentum}"

    # --- coordinates ------------------------------------------------------------------------

    def position(self, x: Tensor, dim: int = 0) -> Tensor:
        """t = K·u(x) ∈ (0, K) for values with channels on ``dim``: bin floor(t), place t − floor(t)."""
        shape = [1] * x.ndim
        shape[dim] = -1
        # clones: autograd must not see later in-place grid moves
        z = (x - self.center.view(shape).clone()) / self.scale.view(shape).clone()
        return (z / (1.0 + z.abs()) + 1.0) * (0.5 * self.bins)

    def _to_x(self, u: Tensor, center: Tensor, scale: Tensor) -> Tensor:
        """Inverse of the squash: x = c + s·v/(1 − |v|), v = 2u − 1, for u (C, m) in (0, 1)."""
        v = 2.0 * u - 1.0
        return center[:, None] + scale[:, None] * v / (1.0 - v.abs())

    def _edges_x(self, center: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
        """The K − 1 inner bin edges in x for a grid (default: the current one)."""
        u = torch.arange(1, self.bins, device=self.cdf.device, dtype=self.cdf.dtype) / self.bins
        center = self.center if center is None else center
        scale = self.scale if scale is None else scale
        return self._to_x(u.expand(self.num_channels, -1), center, scale)

    @staticmethod
    def interpolate(cdf_edges: Tensor, t: Tensor) -> Tensor:
        """F at positions t (C, …) from F at the inner edges (C, K − 1), linear in u within a bin,
        F = 0 at u = 0 and 1 at u = 1."""
        c = cdf_edges.shape[0]
        full = torch.cat([cdf_edges.new_zeros(c, 1), cdf_edges, cdf_edges.new_ones(c, 1)], dim=1)
        flat_t = t.reshape(c, -1)
        k = torch.nan_to_num(flat_t.detach(), nan=0.0).floor().clamp_(0, full.shape[1] - 2).long()
        lo, hi = full.gather(1, k), full.gather(1, k + 1)
        return (lo + (flat_t - k) * (hi - lo)).reshape(t.shape)

    def cdf_at(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        """The sketch's CDF at values x (C, …), with the mid-rank at each channel's atom
        (``t``: their positions, when already computed)."""
        t = self.position(x) if t is None else t
        return self._with_atoms(self.interpolate(self.cdf, t), x, t)

    def _with_atoms(self, f: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """F at values x (C, …) in the atom's bin: F(a−) + m/2 at the atom a, F(a−) below it,
        F(a−) + m + (t − k)(F_{k+1} − F(a−) − m) above it (m = the atom's mass)."""
        c = self.num_channels
        has = (self.atom_mass > 0).view(c, 1)
        atom = self.atom.view(c, 1)
        k = torch.nan_to_num(self.position(atom), nan=0.0).floor().clamp_(0, self.bins - 1).long()
        full = torch.cat([self.cdf.new_zeros(c, 1), self.cdf, self.cdf.new_ones(c, 1)], dim=1)
        f_lo, f_hi = full.gather(1, k).to(f.dtype), full.gather(1, k + 1).to(f.dtype)
        mass = torch.minimum(self.atom_mass.view(c, 1).to(f.dtype), f_hi - f_lo).clamp_min(0)
        xf, tf, ff = x.reshape(c, -1), t.reshape(c, -1), f.reshape(c, -1)
        in_bin = has & (torch.nan_to_num(tf, nan=-1.0).floor() == k)
        above = f_lo + mass + (tf - k) * (f_hi - f_lo - mass)
        atom = atom.to(xf.dtype)
        inside = torch.where(xf == atom, f_lo + mass / 2, torch.where(xf > atom, above, f_lo))
        return torch.where(in_bin, inside, ff).reshape(f.shape)

    def quantile(self, p: Tensor) -> Tensor:
        """Inverse CDF at probabilities p (C, m) (or (m,) for every channel)."""
        p = p.expand(self.num_channels, -1) if p.ndim == 1 else p
        c = self.num_channels
        full = torch.cat([self.cdf.new_zeros(c, 1), self.cdf, self.cdf.new_ones(c, 1)], dim=1)
        k = torch.searchsorted(full.contiguous(), p.contiguous(), right=True).clamp_(1, self.bins) - 1
        lo, hi = full.gather(1, k), full.gather(1, k + 1)
        t = k + (p - lo) / (hi - lo).clamp_min(torch.finfo(full.dtype).tiny)
        u = (t / self.bins).clamp(1e-7, 1 - 1e-7)
        return self._to_x(u, self.center, self.scale)

    # --- updates ----------------------------------------------------------------------------

    def bin_index(self, t: Tensor, dim: int = 0) -> Tensor:
        """Flat (channel, bin) index c·K + floor(t) of every position, channels on ``dim``."""
        shape = [1] * t.ndim
        shape[dim] = -1
        idx = t.detach().long().clamp_(0, self.bins - 1)  # t > 0, so truncation is floor
        return idx.add_(torch.arange(self.num_channels, device=t.device).view(shape) * self.bins)

    def counts(self, t: Tensor, dim: int = 0) -> Tensor:
        """Values per bin (C, K) from positions t, channels on ``dim``."""
        return self.count_index(self.bin_index(t, dim))

    def count_index(self, flat: Tensor) -> Tensor:
        """Values per bin (C, K) from flat (channel, bin) indices of ``bin_index``."""
        c, k = self.num_channels, self.bins
        return torch.bincount(flat.reshape(-1), minlength=c * k).view(c, k).to(self.cdf.dtype)

    @staticmethod
    def edge_cdf(counts: Tensor) -> Tensor:
        """Batch CDF at the inner edges (C, K − 1) from bin counts (C, K)."""
        total = counts.sum(1, keepdim=True).clamp_min(1)
        return counts.cumsum(1)[:, :-1] / total

    @torch.no_grad()
    def update(self, x: Tensor) -> Tensor:
        """Add a batch of values (C, n); returns the batch's bin counts (summed over ranks).
        Non-finite values are counted in ``nonfinite`` and left out."""
        x = x.detach().to(self.cdf.dtype).reshape(self.num_channels, -1)
        fresh = not bool(self.ready.all())
        if fresh:
            self.follow(x)
        t = self.position(x)
        _, counts, bottom, ties, moments = _cdf.batch_counts(x[None], t[None], self.bins, self.center)
        counts = counts.to(self.cdf.dtype)
        self.nonfinite.add_((x.shape[1] - moments[0]).to(self.nonfinite.dtype))
        if synced():
            dist.all_reduce(counts)
        self.observe(counts)
        self.observe_atoms(*_cdf.largest_ties(bottom, ties), counts.sum(1))
        if not fresh:
            self.follow(x)
        return counts

    @torch.no_grad()
    def follow(self, x: Tensor, dim: int = 0) -> None:
        """Let the grid follow the moments of a batch (channels on ``dim``, summed over ranks)."""
        dims = [d for d in range(x.ndim) if d != dim]
        xs = x.detach().to(torch.float64)
        finite = torch.isfinite(xs)
        xs = torch.where(finite, xs, 0.0)
        moments = torch.stack([finite.sum(dims).double(), xs.sum(dims), (xs * xs).sum(dims)])
        if synced():
            dist.all_reduce(moments)
        self._follow(moments)

    @torch.no_grad()
    def follow_moments(self, moments: Tensor) -> None:
        """``follow`` from a batch's per-channel moments (3, C): count, sum, sum of squares."""
        if synced():
            moments = moments.clone()
            dist.all_reduce(moments)
        kernel = pit_cpu() if self.cdf.device.type == "cpu" else None
        if kernel is None:
            return self._follow(moments)
        kernel.follow(moments.double(), self.cdf, self.mean, self.var, self.center, self.scale, self.ready,
                      self.weight, -1.0 if self.momentum is None else float(self.momentum), self.regrid_shift)

    @torch.no_grad()
    def _follow(self, moments: Tensor) -> None:
        """Set the grid from the first batch, then track the running moments (exponential with a
        momentum; pooled over everything seen, ``weight`` values, already counting this batch,
        without) and re-grid when they drift. Channels without finite values are left alone."""
        n, s1, s2 = moments.double()
        has = n > 0
        mean = s1 / n.clamp_min(1)
        var = (s2 / n.clamp_min(1) - mean * mean).clamp_min(0)
        first = ~self.ready & has
        old_mean, old_var = self.mean.double(), self.var.double()
        if self.momentum is None:  # pooled: f = n / W with W the values seen, this batch included
            f = torch.where(self.weight > 0, n / self.weight.double().clamp_min(1), 1.0).clamp(0, 1)
            new_mean = torch.lerp(old_mean, mean, f)
            new_var = torch.lerp(old_var, var, f) + f * (1 - f) * (mean - old_mean) ** 2
        else:
            new_mean = torch.lerp(old_mean, mean, self.momentum)
            new_var = torch.lerp(old_var, var, self.momentum)
        new_mean = torch.where(first, mean, torch.where(has & self.ready, new_mean, old_mean))
        new_var = torch.where(first, var, torch.where(has & self.ready, new_var, old_var))
        self.mean.copy_(new_mean)
        self.var.copy_(new_var)
        std = self.var.sqrt().clamp_min(torch.finfo(self.var.dtype).eps * self.mean.abs().clamp_min(1))
        moved = ((self.mean - self.center).abs() > self.regrid_shift * self.scale) | (
            (std / self.scale - 1).abs() > self.regrid_shift)
        if self.momentum is None:  # cumulative: move only when the data leave the grid
            moved = ((self.mean - self.center).abs() > 2 * self.scale) | (std > 4 * self.scale) | (
                std < self.scale / 4)
        regrid = first | (moved & self.ready & has)
        if self.center.device.type != "cpu" or bool(regrid.any()):  # no sync on accelerators
            self._regrid(regrid, self.mean, std)
        self.ready.logical_or_(has)

    def _regrid(self, where: Tensor, center: Tensor, scale: Tensor) -> None:
        """Move the grid of the channels in ``where`` to (center, scale), re-interpolating the
        CDF onto the new edges (computed for all channels, applied where asked: no sync)."""
        cdf = self.interpolate(self.cdf, self.position(self._edges_x(center, scale)))
        self.cdf.copy_(torch.where(where[:, None], cdf, self.cdf))
        self.center.copy_(torch.where(where, center, self.center))
        self.scale.copy_(torch.where(where, scale, self.scale))

    @torch.no_grad()
    def observe(self, counts: Tensor) -> None:
        """Average the batch CDF given by bin ``counts`` (C, K) into the sketch."""
        n = counts.sum(1)
        batch = self.edge_cdf(counts)
        if self.momentum is None:
            factor = n / (self.weight + n).clamp_min(1)
        else:
            factor = torch.where(self.weight == 0, 1.0, self.momentum)
        factor = torch.where(n > 0, factor, 0.0)  # a batch without finite values changes nothing
        self.cdf.lerp_(batch, factor.to(self.cdf.dtype).unsqueeze(1))
        self.weight.add_(n)

    @torch.no_grad()
    def observe_atoms(self, value: Tensor, size: Tensor, n: Tensor) -> None:
        """Average a batch's largest tie per channel (``value``, NaN for none; ``size`` of the
        batch's n values) into ``atom``/``atom_mass`` with the weights ``observe`` used (call
        it after ``observe``). A tie at another value replaces the atom."""
        share = size / n.clamp_min(1)
        n = n.to(self.weight.dtype)
        before = self.weight - n
        if self.momentum is None:
            factor = n / self.weight.clamp_min(1)
        else:
            factor = torch.where(before <= 0, 1.0, self.momentum)
        factor = torch.where(n > 0, factor, 0.0).to(self.atom_mass.dtype)
        value, share = value.to(self.atom.dtype), share.to(self.atom.dtype)
        same = (value == self.atom) & (self.atom_mass > 0)
        new = (value == value) & ~same & (factor > 0)  # a batch without ties gives NaN
        mass = torch.lerp(self.atom_mass, torch.where(same, share, 0.0), factor)
        self.atom_mass.copy_(torch.where(new, share * factor, mass))
        self.atom.copy_(torch.where(new, value, self.atom))

    @torch.no_grad()
    def merge(self, other: "QuantileSketch") -> "QuantileSketch":
        """Combine ``other`` into this sketch, weighting each by the mass it has seen.

        Exact when both are on the same grid (e.g. ``other`` started as ``self.empty_like()``);
        otherwise ``other`` is evaluated at this grid's edges (interpolation error only).
        """
        theirs = other.interpolate(other.cdf, other.position(self._edges_x()))
        total = (self.weight + other.weight).clamp_min(1)
        mine, share = self.weight / total, other.weight / total
        self.cdf.mul_(mine.unsqueeze(1)).add_(theirs * share.unsqueeze(1))
        has, theirs_has = self.atom_mass > 0, other.atom_mass > 0
        same = has & theirs_has & (self.atom == other.atom)
        self.atom_mass.copy_(torch.where(same, mine * self.atom_mass + share * other.atom_mass,
                                         torch.where(has, mine * self.atom_mass, share * other.atom_mass)))
        self.atom.copy_(torch.where(has, self.atom, other.atom))
        self.weight.add_(other.weight)
        return self

    def empty_like(self) -> "QuantileSketch":
        """A sketch with this grid and no data, for exact merges."""
        new = QuantileSketch(self.num_channels, self.bins, self.momentum, self.regrid_shift,
                             self.cdf.device, self.cdf.dtype)
        for name in ("center", "scale", "mean", "var", "ready", "atom"):
            getattr(new, name).copy_(getattr(self, name))
        return new
