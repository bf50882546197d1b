"""Whitening norms: ZCA from a full-rank covariance, block-diagonal and sparsified ZCA.

Training: per group of c channels, mean μ and covariance Σ over every dim but C (summed over
processes inside an initialised process group), W ≈ Σ_reg^(-1/2) (or, with ``transform``,
the Cholesky W = L⁻¹ or PCA W = Λ^(-1/2) Uᵀ whitening of Σ_reg), y = γ ∘ W (x − μ) + β.
Eval: one affine map y = A x + b from the running statistics; the whitening matrix behind it
is cached until they change.

Both running statistics are kept. ``running_cov`` (default for eval): an average of
covariances is the covariance of the pooled batches, a consistent estimator, whitened once per
change. ``running_whitening``: the average of the batch whitening matrices, what DBN and
IterNorm keep, closer to what the layer did in training when batches are small. Either can
be chosen after training (``eval_from``). The math is in ``exoticnorm.whitening``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .distributed import synced
from . import functional as EF
from . import whitening as W
from . import whitening_kernel as K
from .base import RunningStatsNorm
from .kernels import whiten_cpu

__all__ = ["ZCANorm", "BlockZCANorm", "SparseZCANorm"]

SHRINKAGE = ("auto", "lw")
EVAL_FROM = ("covariance", "whitening")



def synced_moments(xv: Tensor, shift: Tensor, process_group: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Mean (G, c), biased covariance (G, c, c) and the global sample count of grouped samples
    xv (B, G, c, S) over every process: one differentiable all_reduce of [Σ(x − s),
    Σ(x − s)(x − s)ᵀ, M] for a shift s (G, c) shared by all ranks, so the sums merge exactly
    and without cancellation, and unequal batches weigh as one concatenated batch."""
    from torch.distributed.nn.functional import all_reduce

    g, c = xv.shape[1:3]
    total, scatter = W.group_moments(xv, shift)
    count = xv.new_full((1,), float(W.sample_count(xv)))
    packed = all_reduce(torch.cat([total.flatten(), scatter.flatten(), count]), group=process_group)
    count = packed[-1].detach()  # a constant: no gradient flows through it
    mean_s = packed[: g * c].view(g, c) / count
    cov = packed[g * c : -1].view(g, c, c) / count - mean_s.unsqueeze(-1) * mean_s.unsqueeze(-2)
    return shift + mean_s, cov, count


def ranks_mean(value: Tensor, process_group: Any) -> Tensor:
    """The mean of ``value`` over the ranks (no gradient; e.g. each rank's shrinkage estimate)."""
    value = value.detach().clone()
    dist.all_reduce(value, group=process_group)
    return value / dist.get_world_size(process_group)


def check_whitening_options(method: str, iterations: int, shrinkage: str | float) -> None:
    """The options every covariance-whitening norm shares; a ValueError that says what is allowed."""
    if method not in W.METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(W.METHODS)}")
    if not (isinstance(iterations, int) and iterations >= 1):
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    if not (shrinkage in SHRINKAGE or (isinstance(shrinkage, (int, float))
                                       and not isinstance(shrinkage, bool) and 0 <= shrinkage <= 1)):
        raise ValueError(f"shrinkage must be 'auto', 'lw' or a number in [0, 1], got {shrinkage!r}")


class GroupedStatsNorm(RunningStatsNorm):
    """Running statistics per group of ``group_size`` channels (the last group may be short):
    a (groups, g, g) matrix for each name in ``_group_matrices``, reset to the identity, and a
    per-group ``running_shrinkage``; the rest as RunningStatsNorm."""

    _group_matrices: tuple[str, ...] = ("running_cov",)

    def __init__(self, num_features: int, group_size: int, eps: float, momentum: float | None,
                 affine: bool, track_running_stats: bool, device=None, dtype=None) -> None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        positive = isinstance(num_features, int) and num_features > 0
        self._group_size = min(group_size, num_features) if positive else group_size
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)

    @property
    def group_size(self) -> int:
        return self._group_size

    @property
    def num_groups(self) -> int:
        return math.ceil(self.num_features / self._group_size)

    def _running_shape(self, name: str) -> tuple[int, ...]:
        if name in self._group_matrices:
            return (self.num_groups, self._group_size, self._group_size)
        if name == "running_shrinkage":
            return (self.num_groups,)
        return super()._running_shape(name)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if self.track_running_stats:
            for name in self._group_matrices:
                getattr(self, name).copy_(torch.eye(self._group_size).expand_as(getattr(self, name)))


class _Whitening(GroupedStatsNorm):
    """Shared machinery of the ZCA family (see the module docstring)."""

    _group_matrices = ("running_cov", "running_whitening")

    _running_stats = {
        "running_mean": (0.0, True),
        "running_cov": (0.0, False),
        "running_shrinkage": (0.0, False),
        "running_whitening": (0.0, False),
    }
    _convertible_state = ("weight", "bias")
    precise_eval = True
    vmap_training = False

    def __init__(
        self,
        num_features: int,
        group_size: int | None,
        density: float,
        sparsify: str,
        eps: float,
        momentum: float | None,
        affine: bool,
        track_running_stats: bool,
        method: str,
        iterations: int,
        shrinkage: str | float,
        eval_from: str,
        process_group: Any,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        transform: str = "zca",
    ) -> None:
        group_size = num_features if group_size is None else group_size
        super().__init__(num_features, group_size, eps, momentum, affine, track_running_stats, device, dtype)
        check_whitening_options(method, iterations, shrinkage)
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {density!r}")
        if sparsify not in ("whitening", "covariance"):
            raise ValueError(f"sparsify must be 'whitening' or 'covariance', got {sparsify!r}")
        if transform not in W.TRANSFORMS:
            raise ValueError(f"unknown transform {transform!r}; use one of {', '.join(W.TRANSFORMS)}")
        if transform != "zca" and method == "newton":
            raise ValueError(f"method='newton' computes Σ^(-1/2) (transform='zca'); transform="
                             f"{transform!r} uses an exact decomposition: leave method='auto'")
        self.transform = transform
        self.method, self.iterations, self.shrinkage = method, iterations, shrinkage
        self.density, self.sparsify = float(density), sparsify
        if eval_from not in EVAL_FROM:
            raise ValueError(f"eval_from must be one of {', '.join(EVAL_FROM)}, got {eval_from!r}")
        self.eval_from = eval_from
        self.process_group = process_group
        self._eval_cache: tuple | None = None

    # --- the transform ------------------------------------------------------------------

    @property
    def spec(self) -> W.WhiteningSpec:
        return W.WhiteningSpec(self.eps, self.shrinkage, self.density, self.sparsify, self.method,
                               self.iterations, self.transform)

    def _grouped(self, v: Tensor | None, fill: float) -> Tensor | None:
        return W.grouped_vector(v, self._group_size, fill)

    def _synced_stage(self, x: Tensor, group_size: int, weight: Tensor | None, bias: Tensor | None,
                      shift: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, float]:
        """Whiten with the statistics of every process (plain autograd through one all_reduce,
        ``synced_moments``, s = ``shift`` (G, c), the same on all ranks). ρ is the ranks' mean
        estimate (an approximation of the pooled one). Returns y, mean, cov, W, ρ and the
        global count."""
        xv = W.group_view(x, group_size)
        g = xv.shape[1]
        mean, cov, count = synced_moments(xv, shift.to(xv.dtype), self.process_group)
        xc = xv - mean.unsqueeze(-1)
        spec = self.spec
        rho = W.shrinkage_intensity(cov.detach(), xc.detach(), spec, float(count))
        rho = ranks_mean(torch.as_tensor(rho, dtype=cov.dtype, device=cov.device).expand(g), self.process_group)
        w = W.whitening_matrix(cov, rho, spec)
        a, b = W.affine_map(w, None, W.grouped_vector(weight, group_size, 1.0),
                            W.grouped_vector(bias, group_size, 0.0))
        y = W.ungroup(W.block_matmul(a, xc).add(b.unsqueeze(-1)), x.shape)
        return y, mean.detach(), cov.detach(), w.detach(), rho, float(count)

    def _stage(self, x: Tensor, group_size: int, weight: Tensor | None, bias: Tensor | None,
               shift: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, float]:
        """One block-whitening stage with batch statistics: y = γ ∘ W (x − μ) + β per group of
        ``group_size`` channels, synced across processes when in a process group (``shift``
        (G, c) shared by the ranks, None = 0). Returns y, mean, cov, W, ρ, count."""
        if synced(self.process_group):
            if shift is None:
                shift = x.new_zeros(math.ceil(x.shape[1] / group_size), group_size)
            return self._synced_stage(x, group_size, weight, bias, shift)
        y, mean, cov, w, rho = W.whiten_batch(x, weight, bias, group_size, self.spec)
        return y, mean, cov, w, rho, float(EF.values_per_channel(x))

    def _cast_affine(self, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        weight, bias = self.weight, self.bias
        if weight is None or weight.dtype == x.dtype:
            return weight, bias
        return weight.to(x.dtype), bias.to(x.dtype)

    def _fused_step(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, tracking: bool) -> Tensor | None:
        """y by the C++ ZCA step (``whitening_kernel.zca_step``), the running statistics moved in
        the same call, where ``zca_plan`` says it computes this batch (single process); else None."""
        spec, c = self.spec, self._group_size
        plan = K.zca_plan(x, c, spec)
        if plan is None:
            return None
        running = (self.running_mean, self.running_cov, self.running_shrinkage, self.running_whitening,
                   self.num_batches_tracked) if tracking else ()
        try:
            return K.zca_step(x, weight, bias, c, spec.eps, K.step_shrinkage(x, c, spec), plan == "flat",
                              spec.density, running, self.momentum)[0]
        except torch.linalg.LinAlgError:
            return None  # eigh failed (nothing was updated): the torch ops retry with jitter, then Newton–Schulz

    _lean_covers = ("check_input", "_check_batch", "uses_batch_stats", "update_factor", "spec", "_normalize",
                    "_train_forward", "_fused_step", "_cast_affine")

    def _fast_train_step(self, x: Tensor) -> Tensor | None:
        """The C++ ZCA step ``K.zca_step`` (``Norm._lean_covers``; 50-60 µs less per forward+backward
        of ``block-zca`` at 256×16×8×8 than the full forward, measured) for eager, single-process,
        float32/float64 CPU input the kernel takes (as ``K.zca_plan`` and ``K.step_shrinkage``
        decide), the affine in x's dtype and tracked running statistics; an eigh that fails goes
        the full way (whose torch ops retry)."""
        if torch.compiler.is_compiling() or not (
                type(x) is Tensor and x.is_cpu and x.dtype in (torch.float32, torch.float64)
                and 2 <= x.ndim <= 5 and self.track_running_stats and self.transform == "zca"
                and self.method != "newton" and (self.density >= 1.0 or self.sparsify == "whitening")):
            return None
        n, channels, c = x.shape[0], x.shape[1], self._group_size
        flat = x.ndim == 2
        count = x.numel() // channels if channels else 0
        if (channels != self.num_features or count < 2
                or (not flat and not K.spatial_shape_fits(n, channels, x.numel(), c))
                or torch._C._functorch.is_functorch_wrapped_tensor(x) or synced(self.process_group)):
            return None
        shrink = K.shrinkage_arg(self.shrinkage, count, c)
        if shrink < 0 and not flat:
            return None  # Ledoit–Wolf needs the centred samples: the spatial passes do not keep them
        weight, bias, b = self.weight, self.bias, self._buffers
        if (weight is not None and weight.dtype != x.dtype) or not b["running_cov"].is_cpu or whiten_cpu() is None:
            return None
        running = (b["running_mean"], b["running_cov"], b["running_shrinkage"], b["running_whitening"],
                   b["num_batches_tracked"])
        try:
            return K.zca_step(x, weight, bias, c, self.eps, shrink, flat, self.density, running, self.momentum)[0]
        except torch.linalg.LinAlgError:
            return None  # nothing was updated: the full path's torch ops retry

    def _train_forward(self, x: Tensor) -> Tensor:
        weight, bias = self._cast_affine(x)
        tracking = self.training and self.track_running_stats
        if not synced(self.process_group):
            y = self._fused_step(x, weight, bias, tracking)
            if y is not None:
                return y
        shift = None
        if self.track_running_stats and synced(self.process_group):
            shift = self._grouped(self.running_mean, 0.0)
        y, mean, cov, w, rho, count = self._stage(x, self._group_size, weight, bias, shift)
        if tracking:
            unbiased = cov * (count / (count - 1))  # count >= 2, checked before
            EF.update_all_running(
                (self.running_mean, self.running_cov, self.running_shrinkage, self.running_whitening),
                (mean.flatten()[: self.num_features], unbiased, rho, w), self.update_factor())
        return y

    @torch.compiler.disable
    def _eager_train_forward(self, x: Tensor) -> Tensor:
        """``_train_forward`` as a graph break under torch.compile: custom autograd Functions (C++,
        or with a small graph inside) run eagerly. (Eager calls skip this wrapper's few µs.)"""
        return self._train_forward(x)

    def _normalize(self, x: Tensor) -> Tensor:
        dtype = EF.stats_dtype(x)
        with EF.autocast_off(x):
            xs = x.to(dtype)
            if self.uses_batch_stats:
                train = self._eager_train_forward if torch.compiler.is_compiling() else self._train_forward
                return train(xs).to(x.dtype)
            return self._eval_forward(xs).to(x.dtype)

    def _eval_forward(self, xs: Tensor) -> Tensor:
        w, mean = self._eval_map(xs.dtype)
        a, b = W.affine_map(w, mean, self._grouped(self.weight, 1.0), self._grouped(self.bias, 0.0))
        return W.apply_map(a, b, W.group_view(xs, self._group_size), xs.shape)

    def _cached(self, buffers: tuple[Tensor, ...], dtype: torch.dtype, compute):
        """``compute()`` (under no_grad), cached while the very same ``buffers`` (identity and
        in-place version) and settings stay; recomputed under torch.compile, for inference
        tensors and after any swap (load_state_dict(assign=True), functional_call, .to())."""
        cacheable = not torch.compiler.is_compiling() and not any(t.is_inference() for t in buffers)
        key = None
        if cacheable:
            key = (tuple(t._version for t in buffers), self.spec, self.eval_from, dtype)
            cached = self._eval_cache
            if cached is not None and cached[0] == key and all(a is b for a, b in zip(cached[1], buffers)):
                return cached[2]
        with torch.no_grad():
            value = compute()
        if cacheable:
            self._eval_cache = (key, buffers, value)
        return value

    def _eval_map(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(W, mean) from the running statistics, cached (``_cached``)."""
        def compute():
            if self.eval_from == "whitening":
                w = self.running_whitening.to(dtype)
            else:
                w = W.whitening_matrix(self.running_cov.to(dtype), self.running_shrinkage.to(dtype), self.spec)
            return w, self._grouped(self.running_mean, 0.0).to(dtype)

        buffers = (self.running_mean, self.running_cov, self.running_shrinkage, self.running_whitening)
        return self._cached(buffers, dtype, compute)

    def eval_affine(self) -> tuple[Tensor, Tensor]:
        """The eval transform as one affine map y = A x + b on (C,) vectors: (A (C, C), b (C,))."""
        if not self.track_running_stats:
            raise ValueError(f"{type(self).__name__} without running statistics has no eval map")
        with torch.no_grad():
            w, mean = self._eval_map(EF.stats_dtype(self.running_cov))
            a, b = W.affine_map(w, mean, self._grouped(self.weight, 1.0), self._grouped(self.bias, 0.0))
        c = self.num_features
        return torch.block_diag(*a)[:c, :c], b.flatten()[:c]

    def _extra_fields(self) -> dict[str, Any]:
        fields = {**super()._extra_fields(), "method": self.method, "shrinkage": self.shrinkage,
                  "eval_from": self.eval_from}
        if self.transform != "zca":
            fields["transform"] = self.transform
        return fields


_COMMON_DOC = """
    Common options: eps (ridge added to Σ); momentum, track_running_stats as in BatchNorm;
    method "eigh" (exact, with a backward that stays finite at repeated eigenvalues), "newton"
    (``iterations`` Newton–Schulz steps, IterNorm's scheme: a few iterations do NOT fully whiten
    ill-conditioned inputs) or "auto"; shrinkage toward a scaled identity: Ledoit–Wolf's when
    "lw", or when "auto" and a group sees fewer than 4c samples, else a fixed fraction;
    eval_from "covariance" (whiten with the running covariance) or "whitening" (the running
    average of the batch whitening matrices, as DBN and IterNorm do; both are kept, so this can
    be switched after training); process_group for synced statistics; transform "zca"
    (W = Σ^(-1/2)), "cholesky" (W = L⁻¹, Σ = L Lᵀ) or "pca" (W = Λ^(-1/2) Uᵀ, eigenvalues
    descending, each eigenvector's largest-|entry| positive; see ``exoticnorm.whitening``).
"""


class ZCANorm(_Whitening):
    """ZCA whitening from the full C×C covariance: y = γ ∘ Σ^(-1/2) (x − μ) + β."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, method: str = "auto",
                 iterations: int = 5, shrinkage: str | float = "auto",
                 eval_from: str = "covariance", process_group: Any = None,
                 device=None, dtype=None, transform: str = "zca") -> None:
        super().__init__(num_features, None, 1.0, "whitening", eps, momentum, affine,
                         track_running_stats, method, iterations, shrinkage, eval_from,
                         process_group, device, dtype, transform)


class BlockZCANorm(_Whitening):
    """Block-diagonal ZCA: each group of ``group_size`` channels whitened on its own.

    Groups are batched in one computation (the last may be smaller). group_size=1 is
    per-channel standardization (BatchNorm); group_size=C is ``zca``.
    """

    def __init__(self, num_features: int, group_size: int = 16, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, method: str = "auto", iterations: int = 5,
                 shrinkage: str | float = "auto", eval_from: str = "covariance",
                 process_group: Any = None, device=None, dtype=None, transform: str = "zca") -> None:
        super().__init__(num_features, group_size, 1.0, "whitening", eps, momentum, affine,
                         track_running_stats, method, iterations, shrinkage, eval_from,
                         process_group, device, dtype, transform)

    def _extra_fields(self) -> dict[str, Any]:
        return {"group_size": self.group_size, **super()._extra_fields()}


class SparseZCANorm(_Whitening):
    """Sparsified ZCA: keep the ``density`` fraction of largest off-diagonal entries.

    sparsify="whitening" (default) sparsifies W = Σ^(-1/2), then rescales each row so every
    output has unit variance; sparsify="covariance" thresholds the correlations of Σ
    (Bickel–Levina), lifts it back to positive definite, and whitens that. density=1 is
    ``zca``; density=0 is per-channel standardization (with no shrinkage, i.e. at least 4C
    samples under the default ``shrinkage="auto"``).
    """

    def __init__(self, num_features: int, density: float = 0.5, sparsify: str = "whitening",
                 eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, method: str = "auto", iterations: int = 5,
                 shrinkage: str | float = "auto", eval_from: str = "covariance",
                 process_group: Any = None, device=None, dtype=None, transform: str = "zca") -> None:
        super().__init__(num_features, None, density, sparsify, eps, momentum, affine,
                         track_running_stats, method, iterations, shrinkage, eval_from,
                         process_group, device, dtype, transform)

    def _extra_fields(self) -> dict[str, Any]:
        return {"density": self.density, "sparsify": self.sparsify, **super()._extra_fields()}


for _cls in (ZCANorm, BlockZCANorm, SparseZCANorm):
    _cls.__doc__ += _COMMON_DOC
