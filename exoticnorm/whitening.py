"""Whitening math as pure functions, batched over channel groups.

Channels are split into G groups of c (the last one zero-padded) and viewed as
(B, G, c, S) with the samples of each group on axes B and S (``group_view``), so every
covariance here has shape (G, c, c) and every whitening matrix W too. Statistics of
float16/bfloat16 input are computed in float32.

A whitening matrix is any W with W Σ Wᵀ = I; they differ by a rotation (W' = Q W, Q orthogonal).
``transform`` picks one (Kessy, Lewin & Strimmer, "Optimal whitening and decorrelation", 2018):

- "zca": W = Σ^(-1/2), the symmetric one, closest to the identity (least change to x);
- "cholesky": W = L⁻¹ with Σ = L Lᵀ (lower triangular), so output i depends on inputs 1…i
  only (W-MSE, Ermolov et al. 2021; "CD" whitening in Huang et al.'s batch-whitening study);
- "pca": W = Λ^(-1/2) Uᵀ with Σ = U Λ Uᵀ, outputs along the principal axes (DBN's other mode).
  U is only defined up to the sign of each column and, where eigenvalues repeat, a rotation
  within their eigenspace; here the eigenvalues are in descending order and each eigenvector's
  largest-magnitude entry is made positive (the first such entry on a tie), which fixes the
  signs from one step to the next while the spectrum stays separated. Where eigenvalues cross,
  output channels swap; where they coincide (a rank-deficient batch after shrinkage, say) the
  map is not differentiable and its backward leaves the rotation inside the eigenspace out.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .functional import autocast_off, refuse_double_backward


__all__ = [
    "group_view",
    "ungroup",
    "sample_count",
    "block_matmul",
    "group_moments",
    "WhiteningSpec",
    "uses_ledoit_wolf",
    "ledoit_wolf_for",
    "shrinkage_intensity",
    "whitening_matrix",
    "affine_map",
    "grouped_vector",
    "apply_map",
    "whiten_batch",
    "small_map_grads",
    "regularize",
    "ledoit_wolf_intensity",
    "eigh",
    "eigh_on_host",
    "inv_sqrt_eigh",
    "inv_sqrt_newton",
    "inverse_sqrt",
    "inv_cholesky",
    "pca_whitening",
    "whiten_by",
    "sparsify",
    "threshold_covariance",
    "METHODS",
    "TRANSFORMS",
]

METHODS = ("eigh", "newton", "auto")
TRANSFORMS = ("zca", "cholesky", "pca")


def group_view(x: Tensor, group_size: int) -> Tensor:
    """(N, C, *s) → (B, G, c, S), samples on the last axis, as a view where possible.

    With spatial dims B = N and S = prod(s); for (N, C) input B = 1 and S = N (a transposed
    view). Channels are zero-padded to G·c when c does not divide C (the only copy).
    """
    pad = -x.shape[1] % group_size
    if pad:
        x = F.pad(x.movedim(1, -1), (0, pad)).movedim(-1, 1)
    if x.ndim == 2:
        return rearrange(x, "n (g c) -> 1 g c n", c=group_size)
    return rearrange(x, "n (g c) ... -> n g c (...)", c=group_size)


def ungroup(y: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of ``group_view`` for an input of ``shape``: padding dropped."""
    if len(shape) == 2:
        y = rearrange(y, "1 g c n -> n (g c)")
    else:
        y = rearrange(y, "n g c s -> n (g c) s")
    if y.shape[1] != shape[1]:
        y = y[:, : shape[1]]
    return y.reshape(shape)


def block_matmul(a: Tensor, xv: Tensor) -> Tensor:
    """a (G, c, c) applied to every sample: (B, G, c, S) → (B, G, c, S).

    The batch is flattened and ``a`` materialised per (B, G): bmm over an expanded (stride-0)
    batch falls into a slow path.
    """
    b, g, c, s = xv.shape
    out = torch.bmm(a.expand(b, g, c, c).reshape(b * g, c, c), xv.reshape(b * g, c, s))
    return out.view(b, g, c, s)


def sample_count(xv: Tensor) -> int:
    """M = B·S: how many samples each group's statistics see."""
    return xv.shape[0] * xv.shape[-1]


def group_moments(xv: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Per group: Σ(x − s) (G, c) and Σ(x − s)(x − s)ᵀ (G, c, c) for a shift s (G, c).

    With s near the mean, scatter/M − m̄m̄ᵀ (m̄ = sum/M) is the covariance without
    cancellation; sums of these over processes merge exactly when all use the same s.
    """
    xs = xv - shift.unsqueeze(-1)
    return xs.sum((0, 3)), torch.matmul(xs, xs.mT).sum(0)


@dataclass(frozen=True)
class WhiteningSpec:
    """How a covariance becomes a whitening matrix: ridge ``eps``; ``shrinkage`` "auto" (Ledoit–
    Wolf below 4c samples per group), "lw" (always) or a fixed fraction; sparsification to
    ``density`` of W ("whitening") or of the correlations ("covariance"); W by ``transform``
    ("zca": Σ^(-1/2) by ``method`` with ``iterations`` Newton–Schulz steps; "cholesky"; "pca")."""

    eps: float = 1e-5
    shrinkage: str | float = "auto"
    density: float = 1.0
    sparsify: str = "whitening"
    method: str = "auto"
    iterations: int = 5
    transform: str = "zca"


def uses_ledoit_wolf(spec: WhiteningSpec, count: float, group_size: int) -> bool:
    """Whether ρ is Ledoit–Wolf's: ``spec.shrinkage`` "lw", or "auto" with fewer than 4c samples."""
    return ledoit_wolf_for(spec.shrinkage, count, group_size)


def ledoit_wolf_for(shrinkage: str | float, count: float, group_size: int) -> bool:
    """``uses_ledoit_wolf`` from the shrinkage option itself."""
    return shrinkage == "lw" or (shrinkage == "auto" and count < 4 * group_size)


def shrinkage_intensity(cov: Tensor, xc: Tensor, spec: WhiteningSpec, count: float | None = None,
                        differentiable: bool = False) -> Tensor | float:
    """ρ for a batch: Ledoit–Wolf's when ``spec.shrinkage`` is "lw", or "auto" with fewer than
    4c samples (``count``, default the samples of ``xc``); else the fixed fraction (0 for
    "auto"). Without gradient unless ``differentiable``."""
    count = sample_count(xc) if count is None else count
    if uses_ledoit_wolf(spec, count, cov.shape[-1]):
        return ledoit_wolf_intensity(xc, cov, differentiable)
    return 0.0 if isinstance(spec.shrinkage, str) else float(spec.shrinkage)


def whitening_matrix(cov: Tensor, rho: Tensor | float, spec: WhiteningSpec) -> Tensor:
    """W (G, c, c) with W Σ_reg Wᵀ = I by ``spec.transform`` (Σ_reg^(-1/2) for zca) after
    shrinkage ρ, the ridge and sparsification."""
    cov = regularize(cov, spec.eps, rho)
    if spec.density < 1.0 and spec.sparsify == "covariance":
        cov = threshold_covariance(cov, spec.density, spec.eps)
    w = whiten_by(cov, spec.transform, spec.method, spec.iterations)
    if spec.density < 1.0 and spec.sparsify == "whitening":
        w = sparsify(w, cov, spec.density)
    return w


def affine_map(w: Tensor, mean: Tensor | None, weight: Tensor | None,
               bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """A = γ ∘ W and b = β − A·mean, grouped (G, c, c) and (G, c), so that y = A x + b.
    ``weight``/``bias`` are already grouped (G, c) or None; ``mean`` None means centred input."""
    a = w if weight is None else w * weight.to(w.dtype).unsqueeze(-1)
    b = a.new_zeros(a.shape[:2]) if bias is None else bias.to(a.dtype)
    if mean is not None:
        b = b - (a @ mean.unsqueeze(-1)).squeeze(-1)
    return a, b


def grouped_vector(v: Tensor | None, group_size: int, fill: float) -> Tensor | None:
    """(C,) → (G, c), padding with ``fill``."""
    if v is None:
        return None
    pad = -v.shape[0] % group_size
    if pad:
        v = torch.cat([v, v.new_full((pad,), fill)])
    return v.view(-1, group_size)


def apply_map(a: Tensor, b: Tensor, xv: Tensor, shape: torch.Size) -> Tensor:
    """y = A x + b for grouped samples xv (B, G, c, S), as a tensor of ``shape``. Without
    autograd it is written straight into a new tensor (no view, so the custom Function's output
    may be modified in place)."""
    tracked = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or xv.requires_grad)
    vmapped = torch._C._functorch.is_batchedtensor(xv)  # vmap has no batching rule for bmm(out=)
    if not tracked and not vmapped and len(shape) > 2 and shape[1] == xv.shape[1] * xv.shape[2]:  # no padding
        y = xv.new_empty(shape)
        yv = group_view(y, xv.shape[2])
        bsz, g, c, s = xv.shape
        torch.bmm(a.expand(bsz, g, c, c).reshape(bsz * g, c, c), xv.reshape(bsz * g, c, s),
                  out=yv.view(bsz * g, c, s))
        return y.add_(b.reshape(1, -1, *[1] * (len(shape) - 2)))
    y = ungroup(block_matmul(a, xv).add(b.unsqueeze(-1)), shape)
    return y if tracked else y.clone(memory_format=torch.contiguous_format)


def keep_graph(ctx, inputs: tuple, output: tuple) -> None:
    """What a batch-whitening Function's ``setup_context`` shares (outputs y, μ, Σ, W, ρ, a
    saved x-sized tensor, the small graph): the graph and shapes on ``ctx``, the outputs after
    y non-differentiable, and no zero gradients materialised for them (one is x-sized)."""
    ctx.graph = output[6]
    ctx.shape = inputs[0].shape
    ctx.group_size = inputs[3]
    ctx.mark_non_differentiable(*output[1:6])
    ctx.set_materialize_grads(False)


def guarded_backward(ctx, grad: Tensor | None, impl) -> tuple:
    """A batch-whitening Function's backward: ``impl(ctx, grad)`` outside autocast (the
    statistics' dtype), a clear error under create_graph=True, nothing when y has no gradient."""
    if grad is None:  # only y is differentiable
        return None, None, None, None, None
    refuse_double_backward("exoticnorm whitening norms are",
                           "use the norm in eval mode (an affine map) for that part of the loss")
    with autocast_off(grad):
        return impl(ctx, grad)


class WhitenBatch(torch.autograd.Function):
    """y = A(Σ, γ) (x − μ) + b(β) from the batch's own mean μ and covariance Σ, for x (N, C, *s)
    in groups of ``group_size`` channels; W(Σ) as ``spec`` says.

    Returns y (shaped like x), and without gradient μ (G, c), the biased Σ (G, c, c), W and
    the shrinkage ρ (G,) for the running statistics. The small map (Σ, γ, β) → (A, b) is
    differentiated with autograd in backward; the large tensors get hand-written passes:
    ḡ_b = Σ ḡ_y, ḡ_A = Σ ḡ_y xcᵀ, (ḡ_Σ, ḡ_γ, ḡ_β) from the small graph, and
    ḡ_x = Aᵀ (ḡ_y − ḡ_b / M) + (ḡ_Σ + ḡ_Σᵀ)/M · xc (Σ's dependence on μ adds nothing since the
    centred samples sum to zero). ρ is a constant in backward. Not twice differentiable: a
    double backward (create_graph=True) raises.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, group_size: int,
                spec: WhiteningSpec):
        xv = group_view(x, group_size)
        mean = xv.mean((0, 3), keepdim=True)
        xc = xv - mean
        cov = torch.matmul(xc, xc.mT).sum(0).div_(sample_count(xv))
        rho = shrinkage_intensity(cov, xc, spec)
        leaf = cov.detach().requires_grad_()
        params = [None if p is None else p.detach().requires_grad_(p.requires_grad) for p in (weight, bias)]
        with torch.enable_grad():
            w = whitening_matrix(leaf, rho, spec)
            a, b = affine_map(w, None, grouped_vector(params[0], group_size, 1.0),
                              grouped_vector(params[1], group_size, 0.0))
        y = apply_map(a.detach(), b.detach(), xc, x.shape)
        rho = torch.as_tensor(rho, dtype=cov.dtype, device=cov.device).expand(cov.shape[0]).clone()
        return y, mean.reshape(cov.shape[:2]), cov, w.detach(), rho, xc, (leaf, params, a, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[5])  # the centred samples
        keep_graph(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad: Tensor | None, *_):
        return guarded_backward(ctx, grad, WhitenBatch._backward)

    @staticmethod
    def _backward(ctx, grad: Tensor):
        (xc,) = ctx.saved_tensors
        a = ctx.graph[2]
        grad = group_view(grad.to(xc.dtype), xc.shape[2])
        m = sample_count(xc)
        grad_b = grad.sum((0, 3))
        grad_a = torch.matmul(grad, xc.mT).sum(0)
        grad_cov, grad_params = small_map_grads(ctx.graph, grad_a, grad_b)
        at = a.detach().mT
        grad_x = block_matmul(at, grad).sub_((at @ grad_b.unsqueeze(-1)) / m)
        if grad_cov is not None:
            bsz, g, c, s = xc.shape
            sym = ((grad_cov + grad_cov.mT) / m).expand(bsz, g, c, c).reshape(bsz * g, c, c)
            grad_x.view(bsz * g, c, s).baddbmm_(sym, xc.reshape(bsz * g, c, s))
        return ungroup(grad_x, ctx.shape), *grad_params, None, None


def small_map_grads(graph: tuple, grad_a: Tensor, grad_b: Tensor) -> tuple[Tensor | None, list]:
    """Backward through the small map (Σ, γ, β) → (A, b) that a batch-whitening forward recorded
    as ``graph`` = (Σ leaf, [γ, β] leaves or None, A, b): dL/dΣ and [dL/dγ, dL/dβ] (None where
    not wanted) from dL/dA and dL/db. The graph is kept, so callers may backward twice."""
    leaf, params, a, b = graph
    wanted = [leaf] + [p for p in params if p is not None and p.requires_grad]
    outs = [(t, g) for t, g in ((a, grad_a), (b, grad_b)) if t.requires_grad]  # b is a constant without β
    found = iter(torch.autograd.grad([t for t, _ in outs], wanted, [g for _, g in outs],
                                     allow_unused=True, retain_graph=True))
    grad_cov = next(found)
    return grad_cov, [next(found) if p is not None and p.requires_grad else None for p in params]


def whiten_batch(x: Tensor, weight: Tensor | None, bias: Tensor | None, group_size: int,
                 spec: WhiteningSpec) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Whiten x (N, C, *s) with its own statistics, per group of ``group_size`` channels:
    returns y (a new tensor shaped like x) and, without gradient, the mean (G, c), the biased
    covariance (G, c, c), W (G, c, c) and the shrinkage ρ (G,). On the CPU, ZCA by eigh is one
    C++ autograd Function (``whitening_kernel.zca_step``), and the other transforms' big-tensor
    passes run fused in C++ where ``whitening_kernel.supported`` says so."""
    from . import whitening_kernel as K  # imports this module

    plan = K.zca_plan(x, group_size, spec)
    if plan is not None:
        try:
            return K.zca_step(x, weight, bias, group_size, spec.eps, K.step_shrinkage(x, group_size, spec),
                              plan == "flat", spec.density)
        except torch.linalg.LinAlgError:
            pass  # eigh failed: the torch ops below retry it with jitter, then Newton–Schulz
    fn = K.FusedWhitenBatch if K.supported(x, group_size, spec) else WhitenBatch
    y, mean, cov, w, rho, _, _ = fn.apply(x, weight, bias, group_size, spec)
    return y, mean, cov, w, rho


def ledoit_wolf_intensity(xc: Tensor, cov: Tensor, differentiable: bool = False) -> Tensor:
    """Ledoit–Wolf (2004) shrinkage intensity ρ ∈ [0, 1] toward m·I, m = tr(Σ)/c, per group.

    ρ = min(1, b² / d²), b² = (1/M²) Σ_k ‖x_k x_kᵀ − Σ‖²_F, d² = ‖Σ − m I‖²_F, for the centred
    samples x_k of ``xc`` (B, G, c, S); uses Σ_k ‖x_k x_kᵀ − Σ‖²_F = Σ_k ‖x_k‖⁴ − M‖Σ‖²_F.
    Computed without gradient unless ``differentiable`` (then ρ's dependence on the samples is
    part of the backward).
    """
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        m_samples = sample_count(xc)
        c = cov.shape[-1]
        m = cov.diagonal(dim1=-2, dim2=-1).mean(-1)
        fourth = xc.pow(2).sum(2).pow(2).sum((0, 2))
        b2 = (fourth - m_samples * cov.pow(2).sum((-2, -1))) / m_samples**2
        eye = torch.eye(c, device=cov.device, dtype=cov.dtype)
        d2 = (cov - m[:, None, None] * eye).pow(2).sum((-2, -1))
        rho = torch.where(d2 > 0, b2.clamp_min(0) / d2.clamp_min(torch.finfo(cov.dtype).tiny), 0.0)
        return rho.clamp(0.0, 1.0)


def regularize(cov: Tensor, eps: float, rho: Tensor | float = 0.0) -> Tensor:
    """Σ_reg = (1 − ρ) Σ + ρ m I + eps I, m = tr(Σ)/c per group (shrinkage, then a ridge)."""
    eye = torch.eye(cov.shape[-1], device=cov.device, dtype=cov.dtype)
    if isinstance(rho, float) and rho == 0.0:
        return torch.add(cov, eye, alpha=eps)
    rho = torch.as_tensor(rho, device=cov.device, dtype=cov.dtype).reshape(-1, 1, 1)
    m = cov.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
    return (1 - rho) * cov + (rho * m + eps) * eye


EIGH_ROUTES = ("auto", "device", "host")


def eigh_on_host(cov: Tensor) -> bool:
    """Whether ``eigh`` decomposes this CUDA batch (G, c, c) on the host CPU instead of with
    cusolver: ``EXOTICNORM_CUDA_EIGH`` = "host"; "device" and "auto" (default) keep it on the GPU.
    Measured on an H200 (README: "GPU"): alone, the host round trip is faster for one matrix of
    any size up to 512 and slower for 16+ groups of 16, but a ZCA-LeNet trains 1.7x faster with
    every eigh on the device, so "auto" is the device. Both routes are exact to rounding."""
    route = os.environ.get("EXOTICNORM_CUDA_EIGH", "auto")
    if route not in EIGH_ROUTES:  # checked on every device: a typo shows before the run reaches a GPU
        raise ValueError(f"EXOTICNORM_CUDA_EIGH={route!r}: use one of {', '.join(EIGH_ROUTES)}")
    return route == "host" and cov.device.type == "cuda"


def eigh(cov: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` (λ ascending, U), by the route ``eigh_on_host`` picks on CUDA."""
    if not eigh_on_host(cov):
        return torch.linalg.eigh(cov)
    lam, u = torch.linalg.eigh(cov.cpu())
    return lam.to(cov.device), u.to(cov.device)


def _eigh_parts(cov: Tensor) -> tuple[Tensor, Tensor]:
    """U and s = √λ (λ floored at λ_max·eps and the smallest normal number)."""
    lam, u = eigh(cov)  # ascending: lam[..., -1] is the largest
    info = torch.finfo(lam.dtype)
    return u, torch.maximum(lam, lam[..., -1:] * info.eps).clamp_min(info.tiny).sqrt()


def _inv_sqrt_from(u: Tensor, s: Tensor) -> Tensor:
    """U diag(1/s) Uᵀ, exactly symmetric (so sparsification keeps mirrored entries in pairs, as the
    C++ step does)."""
    w = (u / s.unsqueeze(-2)) @ u.mT
    return (w + w.mT) / 2


class _InvSqrtEigh(torch.autograd.Function):
    """W = U diag(λ^(-1/2)) Uᵀ, with the Daleckii–Krein backward written in closed form.

    dL/dΣ = U (K ∘ Uᵀ Ḡ U) Uᵀ with Ḡ the symmetric part of dL/dW and
    K_ij = (λi^(-1/2) − λj^(-1/2)) / (λi − λj) = −1 / (si sj (si + sj)), si = √λi,
    which is also f′(λ) = −½ λ^(-3/2) on the diagonal: no division by λi − λj, so repeated
    or nearly equal eigenvalues give finite, exact gradients.
    """

    @staticmethod
    def forward(ctx, cov: Tensor) -> Tensor:
        u, s = _eigh_parts(cov)
        ctx.save_for_backward(u, s)
        return _inv_sqrt_from(u, s)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        refuse_double_backward("the eigh whitening backward is", "use the norm in eval mode")
        u, s = ctx.saved_tensors
        sym = (grad + grad.mT) / 2
        si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
        k = -1.0 / (si * sj * (si + sj))
        return u @ ((u.mT @ sym @ u) * k) @ u.mT


def inv_sqrt_eigh(cov: Tensor) -> Tensor:
    """Σ^(-1/2) by symmetric eigendecomposition (exact up to rounding); the custom backward
    only where a gradient is wanted (plain ops otherwise, e.g. in eval under vmap)."""
    if torch.is_grad_enabled() and cov.requires_grad:
        return _InvSqrtEigh.apply(cov)
    return _inv_sqrt_from(*_eigh_parts(cov))


def inv_sqrt_newton(cov: Tensor, iterations: int = 5) -> Tensor:
    """Σ^(-1/2) by ``iterations`` Newton–Schulz steps on Σ/tr(Σ) (IterNorm's scheme).

    P₀ = I, P_{k+1} = ½ (3 P_k − P_k³ Σ_N), W = P_T / √tr(Σ). Converges, but slowly on
    ill-conditioned Σ: a few iterations do NOT fully whiten (Cov(WX) stays visibly off I).
    """
    trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
    a = cov / trace
    p = torch.eye(cov.shape[-1], device=cov.device, dtype=cov.dtype).repeat(cov.shape[0], 1, 1)
    for _ in range(iterations):
        p = torch.baddbmm(p, torch.linalg.matrix_power(p, 3), a, beta=1.5, alpha=-0.5)
    return p / trace.sqrt()


def inverse_sqrt(cov: Tensor, method: str = "auto", iterations: int = 5) -> Tensor:
    """Σ^(-1/2) by ``method``: eigh (and "auto", which is eigh: exact everywhere), or newton
    (on an H200 cheaper than eigh from c = 32 up, but it does not whiten: README, "GPU"). A
    failing eigh is retried with jitter, then replaced by Newton–Schulz, with a warning:
    training never stops on it."""
    if method == "newton":
        return inv_sqrt_newton(cov, iterations)
    if method not in ("eigh", "auto"):
        raise ValueError(f"unknown whitening method {method!r}; use one of {', '.join(METHODS)}")
    try:
        return inv_sqrt_eigh(cov)
    except torch.linalg.LinAlgError:
        pass
    jitter = _jitter(cov)
    try:
        out = inv_sqrt_eigh(cov + jitter)
        warnings.warn("eigh failed on the covariance; whitened with a jitter of 1e-4·mean variance",
                      RuntimeWarning, stacklevel=3)
        return out
    except torch.linalg.LinAlgError:
        warnings.warn(f"eigh failed twice; whitened with {iterations} Newton–Schulz iterations",
                      RuntimeWarning, stacklevel=3)
        return inv_sqrt_newton(cov + jitter, iterations)


def whiten_by(cov: Tensor, transform: str = "zca", method: str = "auto", iterations: int = 5) -> Tensor:
    """A whitening matrix of (regularized, positive definite) Σ (G, c, c): Σ^(-1/2) ("zca",
    by ``method``), L⁻¹ ("cholesky") or Λ^(-1/2) Uᵀ ("pca"); see the module docstring."""
    if transform == "zca":
        return inverse_sqrt(cov, method, iterations)
    if transform == "cholesky":
        return inv_cholesky(cov)
    if transform == "pca":
        return pca_whitening(cov)
    raise ValueError(f"unknown whitening transform {transform!r}; use one of {', '.join(TRANSFORMS)}")


def _jitter(cov: Tensor) -> Tensor:
    scale = cov.diagonal(dim1=-2, dim2=-1).mean().abs().item() or 1.0
    return 1e-4 * scale * torch.eye(cov.shape[-1], device=cov.device, dtype=cov.dtype)


def inv_cholesky(cov: Tensor) -> Tensor:
    """W = L⁻¹ for Σ = L Lᵀ (L lower triangular): W Σ Wᵀ = L⁻¹ L Lᵀ L⁻ᵀ = I, and W is lower
    triangular too. A triangular solve against I; autograd differentiates both steps (smooth
    wherever Σ is positive definite). A failed factorization is retried with a jitter of
    1e-4·mean variance, with a warning."""
    try:
        chol = torch.linalg.cholesky(cov)
    except torch.linalg.LinAlgError:
        chol = torch.linalg.cholesky(cov + _jitter(cov))
        warnings.warn("Cholesky failed on the covariance; whitened with a jitter of 1e-4·mean variance",
                      RuntimeWarning, stacklevel=3)
    eye = torch.eye(cov.shape[-1], device=cov.device, dtype=cov.dtype).expand_as(chol)
    return torch.linalg.solve_triangular(chol, eye, upper=False)


def _pca_parts(cov: Tensor) -> tuple[Tensor, Tensor]:
    """U (columns in descending eigenvalue order, each column's largest-|entry| positive) and
    s = √λ (λ floored as in ``_eigh_parts``)."""
    lam, u = eigh(cov)
    lam, u = lam.flip(-1), u.flip(-1)
    pivot = u.abs().argmax(-2, keepdim=True)
    sign = torch.gather(u, -2, pivot).sign()
    u = u * torch.where(sign == 0, torch.ones_like(sign), sign)
    info = torch.finfo(lam.dtype)
    return u, torch.maximum(lam, lam[..., :1] * info.eps).clamp_min(info.tiny).sqrt()


class _PCAWhiten(torch.autograd.Function):
    """W = diag(1/s) Uᵀ (s = √λ, U as in ``_pca_parts``), with the eigenvector backward:

    dL/dΣ = U [diag(−(Ḡ U)_ii / (2 s_i³)) + F ∘ (Uᵀ H)] Uᵀ (symmetrized), H = Ḡᵀ diag(1/s)
    (the gradient for U), F_ij = 1/(λj − λi) for i ≠ j. Pairs with |λi − λj| ≤ 64·ε·λ_max
    (repeated eigenvalues, where U is arbitrary inside the eigenspace) get F_ij = 0: the
    rotation inside a degenerate eigenspace is left out. Signs and ordering are locally
    constant, so they add nothing.
    """

    @staticmethod
    def forward(ctx, cov: Tensor) -> Tensor:
        u, s = _pca_parts(cov)
        ctx.save_for_backward(u, s)
        return u.mT / s.unsqueeze(-1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        refuse_double_backward("the PCA whitening backward is", "use the norm in eval mode")
        u, s = ctx.saved_tensors
        lam = s * s
        gap = lam.unsqueeze(-2) - lam.unsqueeze(-1)  # gap[i, j] = λj − λi
        tol = 64 * torch.finfo(lam.dtype).eps * lam[..., :1, None]
        f = torch.where(gap.abs() > tol, 1.0 / torch.where(gap.abs() > tol, gap, torch.ones_like(gap)),
                        torch.zeros_like(gap))
        h = grad.mT / s.unsqueeze(-2)
        inner = f * (u.mT @ h)
        d_lam = -(grad @ u).diagonal(dim1=-2, dim2=-1) / (2 * s**3)
        inner = inner + torch.diag_embed(d_lam)
        out = u @ inner @ u.mT
        return (out + out.mT) / 2


def pca_whitening(cov: Tensor) -> Tensor:
    """W = Λ^(-1/2) Uᵀ for Σ = U Λ Uᵀ, eigenvalues descending, signs fixed (module docstring);
    the custom backward only where a gradient is wanted."""
    if torch.is_grad_enabled() and cov.requires_grad:
        return _PCAWhiten.apply(cov)
    u, s = _pca_parts(cov)
    return u.mT / s.unsqueeze(-1)


def _offdiag_mask(scores: Tensor, density: float) -> Tensor:
    """Per group, True on the diagonal and on the ``density`` fraction of largest off-diagonal
    scores (rounded to a symmetric pair count when the scores are symmetric)."""
    c = scores.shape[-1]
    eye = torch.eye(c, dtype=torch.bool, device=scores.device)
    k = round(density * (c * c - c))
    if k <= 0:
        return eye.expand_as(scores)
    if k >= c * c - c:
        return torch.ones_like(scores, dtype=torch.bool)
    flat = scores.abs().masked_fill(eye, -1.0).flatten(1)
    threshold = flat.topk(k, dim=-1).values[:, -1:]
    return (flat >= threshold).view_as(scores) | eye


def sparsify(w: Tensor, cov: Tensor, density: float) -> Tensor:
    """Keep the ``density`` fraction of W's largest off-diagonal entries (the diagonal always),
    then rescale each row so each output channel has unit variance under Σ:
    W_s ← diag(W_s Σ W_sᵀ)^(-1/2) W_s. density 1 gives W; density 0 gives diag(Σ)^(-1/2),
    per-channel standardization."""
    mask = _offdiag_mask(w.detach(), density)
    ws = w * mask
    var = ((ws @ cov) * ws).sum(-1)
    return ws * var.clamp_min(torch.finfo(var.dtype).tiny).rsqrt().unsqueeze(-1)


def threshold_covariance(cov: Tensor, density: float, eps: float) -> Tensor:
    """Bickel–Levina thresholding: keep the ``density`` fraction of largest off-diagonal
    correlations and zero the rest; thresholding can lose positive definiteness, so the
    diagonal is then raised by max(0, eps − λ_min) (computed without gradient), which keeps
    the sparsity pattern."""
    std = cov.diagonal(dim1=-2, dim2=-1).clamp_min(torch.finfo(cov.dtype).tiny).sqrt()
    corr = cov / (std.unsqueeze(-1) * std.unsqueeze(-2))
    thresholded = cov * _offdiag_mask(corr.detach(), density)
    with torch.no_grad():
        lift = (eps - torch.linalg.eigvalsh(thresholded)[..., 0]).clamp_min(0.0)
    eye = torch.eye(cov.shape[-1], device=cov.device, dtype=cov.dtype)
    return thresholded + lift[:, None, None] * eye
