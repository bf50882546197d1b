"""Structured whitening (d2l's research idea 7.3: compact matrix variants of ZCA).

``monarch-zca`` (``MonarchZCANorm``): W = Pᵀ B₂ P B₁, a Monarch-style product (Dao et al.,
"Monarch: expressive structured matrices", ICML 2022) of two block-diagonal whitening stages
with a stride permutation P between. With C = b·k channels (``block_size`` b):

- B₁ whitens each of the k groups of b consecutive channels with its batch covariance;
- P regroups the channels, "n (k b) → n (b k)": new group j holds channel j of every old group;
- B₂ whitens each of the b new groups (k channels) with the covariance of B₁'s output;
- Pᵀ puts the channels back in their order; then y = γ ∘ W (x − μ) + β.

Work per sample O(C·(b + k)) and eigendecompositions of size b and k: O(C^1.5) at b = √C,
against O(C²) and one C×C decomposition for ``zca``. Cov(y) = I holds within each B₂ group;
the correlations B₂ cannot reach (between different new groups) stay, so this is not a full
whitening: measured by ``exoticnorm bench-whitening``. With ``transform="pca"`` B₁ rotates each
block into its eigenbasis (descending), so B₂ groups the blocks' i-th principal components
together, and the strongest shared directions are decorrelated across blocks.

``circulant-zca`` (``CirculantZCANorm``), a low-displacement-rank whitening: it assumes the
channel covariance is circulant, Σ_ij = r((j − i) mod C) (stationary along the channel axis,
with wrap-around), i.e. diagonalized by the DFT over channels: Σ = F⁻¹ diag(λ) F. The
estimate is the circulant projection of the batch covariance (its wrapped diagonals averaged,
r_k = (1/C) Σ_i Σ_{i, i+k}), whose eigenvalues are the mean power spectrum
λ_f = E|X_f|² / C, X = DFT_channels(x − μ). Then W = F⁻¹ diag((λ_reg)^(-1/2)) F, applied as
y = irfft(rfft(x − μ) · λ_reg^(-1/2)): O(C log C) per sample, C/2 + 1 numbers of state, and no
decomposition at all. λ_reg = (1 − ρ) λ + ρ m + eps with m = tr(Σ)/C. Each λ_f is a mean
over all n samples, so n < C needs no shrinkage. Exact whitening when Σ is circulant; on
other data it removes only the circulant part of the correlation (``bench-whitening``).

Math in functions, bookkeeping in the modules (running statistics, eval maps, process groups).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from . import functional as EF
from . import whitening as W
from .functional import autocast_off, refuse_double_backward
from .base import RunningStatsNorm
from .distributed import synced
from .zca import EVAL_FROM, _COMMON_DOC, _Whitening

__all__ = [
    "MonarchZCANorm",
    "CirculantZCANorm",
    "stride_permute",
    "stride_unpermute",
    "default_block_size",
    "circulant_power",
    "spectrum_mean",
    "circulant_gain",
    "circulant_apply",
    "circulant_matrix",
    "circulant_whiten",
]


# --- math -----------------------------------------------------------------------------------

def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def default_block_size(channels: int) -> int:
    """The divisor of C closest to √C (the smaller on a tie): both stages then have ≈ √C channels."""
    return min(divisors(channels), key=lambda d: (abs(d - math.sqrt(channels)), d))


def stride_permute(x: Tensor, block_size: int) -> Tensor:
    """(N, k·b, *s) → (N, b·k, *s): channel i·b + j moves to j·k + i, so new group j (k channels)
    takes channel j of every old group of b."""
    return rearrange(x, "n (k b) ... -> n (b k) ...", b=block_size)


def stride_unpermute(x: Tensor, block_size: int) -> Tensor:
    """Inverse of ``stride_permute``."""
    return rearrange(x, "n (b k) ... -> n (k b) ...", b=block_size)


def circulant_power(xc: Tensor) -> tuple[Tensor, Tensor]:
    """X = rfft over channels of samples xc (N, C, *s), and Σ_samples |X_f|² (C//2 + 1,).
    |X|² is written as re² + im² (finite gradient where X_f = 0)."""
    spectrum = torch.fft.rfft(xc, dim=1)
    power = torch.view_as_real(spectrum).square().sum(-1)
    return spectrum, power.sum(EF.channel_dims(power))


def spectrum_mean(lam: Tensor, channels: int) -> Tensor:
    """m = tr(Σ)/C = mean of the full spectrum, from its half (C//2 + 1,) (Parseval)."""
    return (_half_weights(lam, channels) * lam).sum() / channels


def circulant_gain(lam: Tensor, channels: int, eps: float, shrinkage: float) -> Tensor:
    """λ_reg^(-1/2), λ_reg = (1 − ρ) λ + ρ m + eps (m = mean variance), per frequency."""
    if shrinkage:
        lam = (1 - shrinkage) * lam + shrinkage * spectrum_mean(lam, channels)
    return (lam + eps).rsqrt()


def circulant_apply(spectrum: Tensor, gain: Tensor, channels: int) -> Tensor:
    """y = irfft(X · g) over channels: the circulant W = F⁻¹ diag(g) F applied to every sample."""
    shaped = gain.reshape(1, -1, *[1] * (spectrum.ndim - 2))
    return torch.fft.irfft(spectrum * shaped, n=channels, dim=1)


def circulant_matrix(gain: Tensor, channels: int) -> Tensor:
    """The dense C×C circulant F⁻¹ diag(g) F: A_ij = c[(i − j) mod C], c = irfft(g)."""
    c = torch.fft.irfft(gain, n=channels)
    idx = torch.arange(channels, device=gain.device)
    return c[(idx[:, None] - idx[None, :]) % channels]


def _half_weights(lam: Tensor, channels: int) -> Tensor:
    """w_f: how many full-spectrum frequencies the half-spectrum entry f stands for (1 or 2)."""
    weights = torch.full_like(lam, 2.0)
    weights[0] = 1.0
    if channels % 2 == 0:
        weights[-1] = 1.0
    return weights


class _CirculantWhiten(torch.autograd.Function):
    """y = irfft(X · g), X = rfft(x − μ), g = (λ_reg + eps)^(-1/2), λ = Σ|X|²/(M·C), over the
    channels of x (N, C, *s) with μ, λ from the batch itself (M samples per channel).

    Backward with real FFTs only (autograd's rfft backward goes through a complex FFT):
    W = F⁻¹ diag(g) F is symmetric, so the direct term is W ḡ_y = irfft(rfft(ḡ_y) · g); the
    half-spectrum gain gets ḡ_g_f = (w_f / C) Σ Re(X_f conj(rfft(ḡ_y)_f)) (w_f ∈ {1, 2}: how
    many frequencies f stands for), then ḡ_λ' = −½ g³ ḡ_g, ḡ_λ = (1 − ρ) ḡ_λ' + ρ w/C Σ ḡ_λ',
    and λ's term is (2/M) irfft(ḡ_λ · X / w); the mean's is minus the per-channel mean of the
    total. ρ is a constant. Not twice differentiable (a double backward raises).
    """

    @staticmethod
    def forward(ctx, x: Tensor, eps: float, shrinkage: float):
        c = x.shape[1]
        mean = x.mean(EF.channel_dims(x))
        spectrum, power = circulant_power(x - EF.per_channel(mean, x.ndim))
        count = EF.values_per_channel(x)
        lam = power / (count * c)
        gain = circulant_gain(lam, c, eps, shrinkage)
        ctx.save_for_backward(spectrum, gain)
        ctx.shrinkage, ctx.count = shrinkage, count
        ctx.mark_non_differentiable(mean, lam, gain)
        return circulant_apply(spectrum, gain, c), mean, lam, gain

    @staticmethod
    def backward(ctx, grad: Tensor, *_):
        refuse_double_backward("exoticnorm circulant whitening is",
                               "use the norm in eval mode (an affine map) for that part of the loss")
        with autocast_off(grad):
            spectrum, gain = ctx.saved_tensors
            c = grad.shape[1]
            g_hat = torch.fft.rfft(grad.to(gain.dtype), dim=1)
            weights = _half_weights(gain, c)
            dims = EF.channel_dims(g_hat)
            grad_gain = (weights / c) * (spectrum.real * g_hat.real + spectrum.imag * g_hat.imag).sum(dims)
            grad_lam = -0.5 * gain**3 * grad_gain
            if ctx.shrinkage:
                grad_lam = (1 - ctx.shrinkage) * grad_lam + ctx.shrinkage * weights / c * grad_lam.sum()
            shape = (1, -1, *[1] * (grad.ndim - 2))
            combined = g_hat * gain.view(shape) + spectrum * (2.0 / ctx.count * grad_lam / weights).view(shape)
            grad_x = torch.fft.irfft(combined, n=c, dim=1)
            grad_x = grad_x - EF.per_channel(grad_x.mean(EF.channel_dims(grad_x)), grad_x.ndim)
            return grad_x, None, None


def circulant_whiten(x: Tensor, eps: float, shrinkage: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Whiten x (N, C, *s) with its own circulant covariance estimate: returns y (a new tensor,
    no affine) and, without gradient, the mean (C,), the biased spectrum λ (C//2 + 1,) and the
    gain (λ_reg + eps)^(-1/2)."""
    return _CirculantWhiten.apply(x, eps, shrinkage)


# --- Monarch --------------------------------------------------------------------------------

class MonarchZCANorm(_Whitening):
    """Monarch whitening: W = Pᵀ B₂ P B₁, two block-diagonal whitening stages with a stride
    permutation P between (see ``exoticnorm.structured``); y = γ ∘ W (x − μ) + β.

    ``block_size`` b must divide C (default: the divisor closest to √C); stage 1 whitens C/b
    groups of b channels, stage 2 b groups of C/b. b = 1 is per-channel standardization then
    full whitening; b = C is full whitening then per-channel scaling (both whiten fully).
    Running statistics per stage: the covariances of x (``running_cov``) and of stage 1's
    output (``running_cov2``), and the average batch whitening matrices of both; eval applies
    W₁ and W₂ from them (``eval_from``). ``eval_affine()`` returns W as one dense map.
    """

    _running_stats = {
        **_Whitening._running_stats,
        "running_cov2": (0.0, False),
        "running_shrinkage2": (0.0, False),
        "running_whitening2": (0.0, False),
    }

    def __init__(self, num_features: int, block_size: int | None = None, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, method: str = "auto", iterations: int = 5,
                 shrinkage: str | float = "auto", eval_from: str = "covariance",
                 process_group: Any = None, device=None, dtype=None, transform: str = "zca") -> None:
        if isinstance(num_features, int) and not isinstance(num_features, bool) and num_features > 0:
            if block_size is None:
                block_size = default_block_size(num_features)
            if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 \
                    or num_features % block_size:
                raise ValueError(
                    f"block_size={block_size!r} does not divide num_features={num_features}: Monarch "
                    f"whitening needs C = block_size · (C / block_size); choose one of "
                    f"{divisors(num_features)}")
            self._stage2_size = num_features // block_size
        super().__init__(num_features, block_size, 1.0, "whitening", eps, momentum, affine,
                         track_running_stats, method, iterations, shrinkage, eval_from,
                         process_group, device, dtype, transform)

    @property
    def block_size(self) -> int:
        return self._group_size

    def _running_shape(self, name: str) -> tuple[int, ...]:
        b, k = self._group_size, self._stage2_size
        if name in ("running_cov2", "running_whitening2"):
            return (b, k, k)
        if name == "running_shrinkage2":
            return (b,)
        return super()._running_shape(name)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if self.track_running_stats:
            for name in ("running_cov2", "running_whitening2"):
                getattr(self, name).copy_(torch.eye(self._stage2_size).expand_as(self.running_cov2))

    def _permuted(self, v: Tensor | None) -> Tensor | None:
        return None if v is None else rearrange(v, "(k b) -> (b k)", b=self._group_size)

    @torch.compiler.disable  # custom Functions with small autograd graphs inside: eager only
    def _train_forward(self, x: Tensor) -> Tensor:
        weight, bias = self._cast_affine(x)
        b, k = self._group_size, self._stage2_size
        shift = self._grouped(self.running_mean, 0.0) if self.track_running_stats else None
        y1, mean, cov1, w1, rho1, count = self._stage(x, b, None, None, shift)
        y2, _, cov2, w2, rho2, _ = self._stage(stride_permute(y1, b), k, self._permuted(weight),
                                               self._permuted(bias), None)
        factor = self.update_factor()
        if self.training and self.track_running_stats:
            unbiased = count / (count - 1)
            EF.update_running(self.running_mean, mean.flatten(), factor)
            for suffix, cov, rho, w in (("", cov1, rho1, w1), ("2", cov2, rho2, w2)):
                EF.update_running(getattr(self, "running_cov" + suffix), cov * unbiased, factor)
                EF.update_running(getattr(self, "running_shrinkage" + suffix), rho, factor)
                EF.update_running(getattr(self, "running_whitening" + suffix), w, factor)
        return stride_unpermute(y2, b)

    def _eval_map(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """(W₁, W₂, mean) from the running statistics, cached."""
        def compute():
            if self.eval_from == "whitening":
                w1, w2 = self.running_whitening.to(dtype), self.running_whitening2.to(dtype)
            else:
                w1 = W.whitening_matrix(self.running_cov.to(dtype), self.running_shrinkage.to(dtype), self.spec)
                w2 = W.whitening_matrix(self.running_cov2.to(dtype), self.running_shrinkage2.to(dtype), self.spec)
            return w1, w2, self._grouped(self.running_mean, 0.0).to(dtype)

        buffers = (self.running_mean, self.running_cov, self.running_shrinkage, self.running_whitening,
                   self.running_cov2, self.running_shrinkage2, self.running_whitening2)
        return self._cached(buffers, dtype, compute)

    def _monarch_map(self, xs: Tensor, w1: Tensor, w2: Tensor, mean: Tensor | None,
               weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """γ ∘ Pᵀ B₂ P B₁ (x − mean) + β, stage by stage (O(C^1.5) per sample)."""
        b, k = self._group_size, self._stage2_size
        a1, c1 = W.affine_map(w1, mean, None, None)
        z = stride_permute(W.apply_map(a1, c1, W.group_view(xs, b), xs.shape), b)
        a2, c2 = W.affine_map(w2, None, W.grouped_vector(self._permuted(weight), k, 1.0),
                              W.grouped_vector(self._permuted(bias), k, 0.0))
        return stride_unpermute(W.apply_map(a2, c2, W.group_view(z, k), z.shape), b)

    def _eval_forward(self, xs: Tensor) -> Tensor:
        w1, w2, mean = self._eval_map(xs.dtype)
        return self._monarch_map(xs, w1, w2, mean, self.weight, self.bias)

    def eval_affine(self) -> tuple[Tensor, Tensor]:
        """The eval transform as one affine map y = A x + b on (C,) vectors: (A (C, C), b (C,))."""
        if not self.track_running_stats:
            raise ValueError(f"{type(self).__name__} without running statistics has no eval map")
        with torch.no_grad():
            w1, w2, mean = self._eval_map(EF.stats_dtype(self.running_cov))
            eye = torch.eye(self.num_features, dtype=w1.dtype, device=w1.device)
            a = self._monarch_map(eye, w1, w2, None, self.weight, None).mT  # column j = A e_j
            b = -(a @ mean.flatten())
            if self.bias is not None:
                b = b + self.bias.to(b.dtype)
        return a, b

    def _extra_fields(self) -> dict[str, Any]:
        return {"block_size": self.block_size, **super()._extra_fields()}


MonarchZCANorm.__doc__ += _COMMON_DOC


# --- circulant ------------------------------------------------------------------------------

class CirculantZCANorm(RunningStatsNorm):
    """Circulant whitening: W = F⁻¹ diag(λ^(-1/2)) F by an FFT over channels, assuming a
    circulant covariance (see ``exoticnorm.structured``); y = γ ∘ W (x − μ) + β.

    O(C log C) per sample, no decomposition. Needs C ≥ 2. Options: eps (ridge on every
    eigenvalue λ_f); shrinkage ρ ∈ [0, 1] toward the mean variance (default 0); momentum and
    track_running_stats as in BatchNorm; eval_from "covariance" (the running spectrum, i.e.
    the circulant projection of the running covariance, default) or "whitening" (the running
    average of the batch gains λ^(-1/2)); process_group for statistics summed over processes
    (one all_reduce of [Σ(x − s), Σ|rfft(x − s)|², n]).
    """

    _running_stats = {
        "running_mean": (0.0, True),
        "running_spectrum": (1.0, False),
        "running_gain": (1.0, False),
    }
    _convertible_state = ("weight", "bias")
    precise_eval = True
    vmap_training = False

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, shrinkage: float = 0.0,
                 eval_from: str = "covariance", process_group: Any = None,
                 device=None, dtype=None) -> None:
        if isinstance(num_features, int) and not isinstance(num_features, bool) and num_features == 1:
            raise ValueError(
                "circulant-zca needs at least 2 channels: with C = 1 the circulant covariance is "
                "the variance and there is nothing to decorrelate; use 'bn'")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not 0 <= shrinkage <= 1:
            raise ValueError(f"shrinkage must be a number in [0, 1], got {shrinkage!r}")
        if eval_from not in EVAL_FROM:
            raise ValueError(f"eval_from must be one of {', '.join(EVAL_FROM)}, got {eval_from!r}")
        self.shrinkage, self.eval_from, self.process_group = float(shrinkage), eval_from, process_group

    def _running_shape(self, name: str) -> tuple[int, ...]:
        if name in ("running_spectrum", "running_gain"):
            return (self.num_features // 2 + 1,)
        return super()._running_shape(name)

    def _synced_statistics(self, xs: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
        """mean (C,), X = rfft(x − mean), λ (biased, C//2 + 1) and the sample count summed over
        the processes (plain autograd through one all_reduce of [Σ(x − s), Σ|rfft(x − s)|², n],
        s = the running mean that all ranks share)."""
        from torch.distributed.nn.functional import all_reduce

        c = self.num_features
        shift = self.running_mean.to(xs.dtype) if self.track_running_stats else xs.new_zeros(c)
        shifted = xs - EF.per_channel(shift, xs.ndim)
        _, power = circulant_power(shifted)
        count = xs.new_full((1,), float(EF.values_per_channel(xs)))
        packed = all_reduce(torch.cat([shifted.sum(EF.channel_dims(xs)), power, count]),
                            group=self.process_group)
        count = packed[-1]
        mean_s = packed[:c] / count
        _, mean_power = circulant_power(mean_s.unsqueeze(0))
        lam = (packed[c:-1] / count - mean_power) / c
        mean = shift + mean_s
        spectrum = torch.fft.rfft(xs - EF.per_channel(mean, xs.ndim), dim=1)
        return mean, spectrum, lam, float(count)

    @torch.compiler.disable  # a custom Function and in-place running updates: eager only
    def _train_forward(self, xs: Tensor) -> Tensor:
        c = self.num_features
        if synced(self.process_group):
            mean, spectrum, lam, count = self._synced_statistics(xs)
            gain = circulant_gain(lam, c, self.eps, self.shrinkage)
            y = circulant_apply(spectrum, gain, c)
        else:
            y, mean, lam, gain = circulant_whiten(xs, self.eps, self.shrinkage)
            count = float(EF.values_per_channel(xs))
        factor = self.update_factor()
        if self.training and self.track_running_stats:
            EF.update_running(self.running_mean, mean, factor)
            EF.update_running(self.running_spectrum, lam * (count / (count - 1)), factor)
            EF.update_running(self.running_gain, gain, factor)
        return y

    def _gain(self, dtype: torch.dtype) -> Tensor:
        if self.eval_from == "whitening":
            return self.running_gain.to(dtype)
        return circulant_gain(self.running_spectrum.to(dtype), self.num_features, self.eps, self.shrinkage)

    def _normalize(self, x: Tensor) -> Tensor:
        dtype = EF.stats_dtype(x)
        with EF.autocast_off(x):
            xs = x.to(dtype)
            if self.uses_batch_stats:
                y = self._train_forward(xs)
            else:
                mean = self.running_mean.to(dtype)
                spectrum = torch.fft.rfft(xs - EF.per_channel(mean, xs.ndim), dim=1)
                y = circulant_apply(spectrum, self._gain(dtype), self.num_features)
            return EF.affine_normalize(y, None, None, self.weight, self.bias, 0.0).to(x.dtype)

    def eval_affine(self) -> tuple[Tensor, Tensor]:
        """The eval transform as one affine map y = A x + b on (C,) vectors: (A (C, C), b (C,))."""
        if not self.track_running_stats:
            raise ValueError(f"{type(self).__name__} without running statistics has no eval map")
        with torch.no_grad():
            dtype = EF.stats_dtype(self.running_spectrum)
            a = circulant_matrix(self._gain(dtype), self.num_features)
            if self.weight is not None:
                a = a * self.weight.to(dtype).unsqueeze(-1)
            b = -(a @ self.running_mean.to(dtype))
            if self.bias is not None:
                b = b + self.bias.to(dtype)
        return a, b

    def _extra_fields(self) -> dict[str, Any]:
        return {**super()._extra_fields(), "shrinkage": self.shrinkage, "eval_from": self.eval_from}
