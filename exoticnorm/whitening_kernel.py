"""Batch whitening on the CPU in C++ (``csrc/whiten_cpu.cpp``): two routes.

``zca_step`` (where ``zca_plan`` says so: transform "zca" by eigh, W sparsified or not as
SparseZCANorm's "whitening" mode) is the whole training step as a C++ autograd Function: one
call forward, one backward, no Python between, the c×c map included (in double up to 32
channels per group). Spatial input goes through the four passes below; (N, C) input through
BLAS, Ledoit–Wolf's ρ included.

``FusedWhitenBatch`` (the other transforms, Newton–Schulz, thresholded covariances) runs the
same four passes with the c×c map as torch ops differentiated by autograd, as
``whitening.WhitenBatch``. The passes, for y = A (x − μ) + b with A = γ ∘ W(Σ), b = β:

- forward: the shifted sums Σ(x − s) and Σ(x − s)(x − s)ᵀ per group in one pass (s: the first
  sample's per-channel mean, so the sums neither overflow nor cancel; double accumulators),
  then y = A (x − μ) + b in one pass. Nothing of the input's size is stored but x itself
  (WhitenBatch keeps the centred copy).
- backward: ḡ_b = Σ ḡ_y and ḡ_A = Σ ḡ_y (x − μ)ᵀ in one pass, the map's gradient, then
  ḡ_x = Aᵀ ḡ_y + S (x − μ) + v in one pass, with S = (ḡ_Σ + ḡ_Σᵀ)/M and v = −Aᵀ ḡ_b / M.
  Values are centred before they are multiplied, so inputs far from zero lose no more than in
  WhitenBatch.

``supported`` says when the passes apply: spatial input in float32/float64 with 8+ positions, a
shrinkage that does not need the centred samples (Ledoit–Wolf's does), groups that divide C, no
process group (the synced path sums moments across ranks first).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from . import whitening as W
from .kernels import whiten_cpu

__all__ = ["supported", "FusedWhitenBatch", "zca_plan", "step_shrinkage", "zca_step"]


def supported(x: Tensor, group_size: int, spec: W.WhiteningSpec) -> bool:
    """Whether ``FusedWhitenBatch`` computes this batch (else ``WhitenBatch`` does)."""
    if x.device.type != "cpu" or x.ndim < 3 or x.dtype not in (torch.float32, torch.float64):
        return False
    if not spatial_shape_fits(x.shape[0], x.shape[1], x.numel(), group_size):
        return False
    count = x.numel() // x.shape[1]
    if W.uses_ledoit_wolf(spec, count, group_size):
        return False  # Ledoit–Wolf needs the centred samples
    return whiten_cpu() is not None


class FusedWhitenBatch(torch.autograd.Function):
    """``WhitenBatch``'s map and outputs (y, μ, Σ, W, ρ) by the fused passes (module docstring)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, group_size: int, spec: W.WhiteningSpec):
        kernel = whiten_cpu()
        c = group_size
        x3 = rearrange(x, "n c ... -> n c (...)").contiguous()
        g, m = x3.shape[1] // c, x3.shape[0] * x3.shape[2]
        shift = rearrange(x3[0].mean(-1), "(g c) -> g c", c=c).contiguous()
        s1, s2 = kernel.moments(x3, shift, c)
        mean_s = s1 / m
        cov = (s2 / m - mean_s.unsqueeze(-1) * mean_s.unsqueeze(-2)).to(x.dtype)
        mean = shift + mean_s.to(x.dtype)
        rho = W.shrinkage_intensity(cov, None, spec, count=m)
        leaf = cov.detach().requires_grad_()
        params = [None if p is None else p.detach().requires_grad_(p.requires_grad) for p in (weight, bias)]
        with torch.enable_grad():
            w = W.whitening_matrix(leaf, rho, spec)
            a, b = W.affine_map(w, None, W.grouped_vector(params[0], c, 1.0), W.grouped_vector(params[1], c, 0.0))
        y = torch.empty(x.shape, dtype=x.dtype)  # not a view: the output may be modified in place
        kernel.affine(x3, a.detach().contiguous(), mean.contiguous(), b.detach().contiguous(), c, y)
        rho = torch.as_tensor(rho, dtype=cov.dtype).expand(g).clone()
        return y, mean, cov, w.detach(), rho, x3, (leaf, params, a, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[5], output[1])  # x as (N, C, S), μ
        W.keep_graph(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad: Tensor | None, *_):
        return W.guarded_backward(ctx, grad, FusedWhitenBatch._backward)

    @staticmethod
    def _backward(ctx, grad: Tensor):
        kernel = whiten_cpu()
        x3, mean = ctx.saved_tensors
        a = ctx.graph[2]
        c = ctx.group_size
        m = x3.shape[0] * x3.shape[2]
        gy3 = grad.to(x3.dtype).reshape(x3.shape).contiguous()
        grad_b, grad_a = (t.to(x3.dtype) for t in kernel.grad_moments(gy3, x3, mean.contiguous(), c))
        grad_cov, grad_params = W.small_map_grads(ctx.graph, grad_a, grad_b)
        at = a.detach().mT.contiguous()
        sym = torch.zeros_like(at) if grad_cov is None else (grad_cov + grad_cov.mT) / m
        v = -(at @ grad_b.unsqueeze(-1)).squeeze(-1) / m
        gx = kernel.grad_input(gy3, x3, at, sym.contiguous(), mean.contiguous(), v.contiguous(), c)
        return gx.view(ctx.shape), *grad_params, None, None


def zca_plan(x: Tensor, group_size: int, spec: W.WhiteningSpec) -> str | None:
    """"flat" ((N, C) input) or "spatial" where ``zca_step`` computes this batch, else None."""
    if spec.transform != "zca" or spec.method == "newton" or (spec.density < 1.0 and spec.sparsify != "whitening"):
        return None
    if x.ndim == 2 and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.shape[0] > 0:
        return "flat" if whiten_cpu() is not None else None
    return "spatial" if supported(x, group_size, spec) else None


def spatial_shape_fits(n: int, channels: int, numel: int, group_size: int) -> bool:
    """Whether the spatial passes take (N, C, *) input of ``numel`` values: groups that divide C,
    a batch, and 8+ positions (else padding, empty, or fc-like, where BLAS does better)."""
    return not (channels % group_size or n == 0 or numel < 8 * n * channels)


def step_shrinkage(x: Tensor, group_size: int, spec: W.WhiteningSpec) -> float:
    """ρ as ``zca_step`` takes it: the fixed fraction, or −1 for Ledoit–Wolf's estimate."""
    return shrinkage_arg(spec.shrinkage, x.numel() // x.shape[1], group_size)


def shrinkage_arg(shrinkage: str | float, count: int, group_size: int) -> float:
    """``step_shrinkage`` from the shrinkage option and the sample count."""
    if W.ledoit_wolf_for(shrinkage, count, group_size):
        return -1.0
    return 0.0 if isinstance(shrinkage, str) else float(shrinkage)


def zca_step(x: Tensor, weight: Tensor | None, bias: Tensor | None, group_size: int, eps: float, shrink: float,
             flat: bool, density: float = 1.0, running: tuple[Tensor, ...] = (),
             momentum: float | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``WhitenBatch``'s outputs (y, μ, Σ, W, ρ) for ZCA (W sparsified to ``density`` < 1 as
    ``whitening.sparsify``) by a C++ autograd Function: one call forward, one backward, no Python
    between (``zca_step`` in csrc/whiten_cpu.cpp, whose comments state the math). ``shrink``: ρ, or
    −1 for Ledoit–Wolf's ((N, C) input only); ``flat``: (N, C) input. Not twice differentiable.

    ``running``: a norm's (running_mean, running_cov, running_shrinkage, running_whitening,
    num_batches_tracked), moved in the same call toward (μ, M/(M − 1) Σ, ρ, W) by ``momentum``
    (None: a cumulative average), as ``RunningStatsNorm.update_factor`` and ``lerp_`` would."""
    momentum = -1.0 if momentum is None else float(momentum)
    return tuple(whiten_cpu().zca_step(x, weight, bias, group_size, eps, shrink, flat, density, list(running),
                                       momentum))
