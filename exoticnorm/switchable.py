"""Switchable whitening (Pan, Zhan, Shi, Tang & Luo, "Switchable Whitening for Deep
Representation Learning", ICCV 2019).

Per group of c channels and per sample n, the mean and covariance used for whitening are
learned convex mixtures of several estimators:

    μ̂_n = Σ_k ω_k μ_k,   Σ̂_n = Σ_k ω'_k Σ_k,   ω = softmax(λ_μ), ω' = softmax(λ_Σ),
    y_n = γ ∘ (Σ̂_n + eps I)^(-1/2) (x_n − μ̂_n) + β,

over the components k:

- "bw" batch whitening: μ_B and the full c×c Σ_B over the batch and positions;
- "iw" instance whitening: the sample's own μ_n and c×c Σ_n over its positions;
- "bn": μ_B and diag(Σ_B);  "in": μ_n and diag(Σ_n);
- "ln": the sample's mean and variance over all its channels and positions, μ 1 and σ² I.

Instance statistics over one position (an (N, C) input, or a 1×1 map) are μ_n = x_n and
Σ_n = 0: the instance terms then only pull the centring toward x_n. Σ_B gets Ledoit–Wolf
shrinkage when a group sees fewer than 4c values (``shrinkage="auto"``), as for ``zca``
(differentiated in one process; in a process group ρ is the ranks' mean estimate, a constant).
Training uses μ_B, Σ_B of the batch (summed over processes in a process group) and keeps
their running averages; eval uses those with the per-sample statistics of each input, so
eval is an affine map only when every component is a batch one ("bw", "bn").
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from . import functional as EF
from . import whitening as W
from .distributed import synced
from .zca import GroupedStatsNorm, check_whitening_options, ranks_mean, synced_moments

__all__ = ["SwitchableWhitening", "switchable_whiten", "COMPONENTS"]

COMPONENTS = ("bw", "iw", "bn", "in", "ln")
BATCH_COMPONENTS = ("bw", "bn")


def per_sample_view(x: Tensor, group_size: int) -> Tensor:
    """(N, C, *s) → (N, G, c, S), channels zero-padded to G·c; S = 1 for (N, C) input."""
    pad = -x.shape[1] % group_size
    if pad:
        x = torch.nn.functional.pad(x.movedim(1, -1), (0, pad)).movedim(-1, 1)
    return rearrange(x, "n (g c) ... -> n g c (...)", c=group_size)


def switchable_whiten(xv: Tensor, batch_mean: Tensor, batch_cov: Tensor, layer_mean: Tensor,
                      layer_var: Tensor, mean_weight: Tensor, cov_weight: Tensor,
                      components: tuple[str, ...], spec: W.WhiteningSpec) -> Tensor:
    """Whiten samples xv (N, G, c, S) with the mixtures μ̂_n, Σ̂_n of the module docstring.

    batch_mean (G, c), batch_cov (G, c, c) (already shrunk, no ridge); layer_mean, layer_var
    (N,); mean_weight, cov_weight: the softmax weights (K,) in ``components`` order. The ridge
    ``spec.eps`` and ``spec.transform``/``method`` make W of each Σ̂_n. Returns (N, G, c, S)."""
    n, g, c, s = xv.shape
    inst_mean = xv.mean(-1, keepdim=True)
    inst_c = xv - inst_mean
    inst_cov = inst_c @ inst_c.mT / s if {"iw", "in"} & set(components) else None
    eye = torch.eye(c, dtype=xv.dtype, device=xv.device)
    means = {"bw": batch_mean[None, ..., None], "bn": batch_mean[None, ..., None],
             "iw": inst_mean, "in": inst_mean, "ln": layer_mean.view(n, 1, 1, 1)}
    covs = {"bw": lambda: batch_cov[None], "bn": lambda: torch.diag_embed(batch_cov.diagonal(dim1=-2, dim2=-1))[None],
            "iw": lambda: inst_cov, "in": lambda: torch.diag_embed(inst_cov.diagonal(dim1=-2, dim2=-1)),
            "ln": lambda: layer_var.view(n, 1, 1, 1) * eye}
    mean = sum(mean_weight[k] * means[name] for k, name in enumerate(components))
    cov = sum(cov_weight[k] * covs[name]() for k, name in enumerate(components))
    w = W.whitening_matrix(cov.reshape(-1, c, c), 0.0, spec).view(cov.shape)  # (N or 1, G, c, c)
    return w @ (xv - mean)


class SwitchableWhitening(GroupedStatsNorm):
    """Switchable whitening (Pan et al. 2019): whiten with learned softmax mixtures of batch,
    instance and layer means and covariances (see ``exoticnorm.switchable``).

    Options: group_size c (default 16; channels whitened together, the last group may be
    smaller); components, a subset of ("bw", "iw", "bn", "in", "ln") (default all five, their
    SW with five estimators); tie_weight (one set of weights for means and covariances);
    eps (ridge), shrinkage of the batch covariance ("auto": Ledoit–Wolf below 4c values per
    group, "lw", or a fraction); method/iterations ("eigh" exact, or "newton", their choice);
    momentum, track_running_stats (running μ_B and Σ_B for eval); process_group (batch
    statistics summed over processes, unequal batches weighed exactly). The mixing logits
    λ_μ, λ_Σ are the parameters ``mean_weight`` and ``cov_weight`` (zeros at start: equal
    weights).
    """

    _running_stats = {
        "running_mean": (0.0, True),
        "running_cov": (0.0, False),
        "running_shrinkage": (0.0, False),
    }
    _convertible_state = ("weight", "bias")
    precise_eval = True
    vmap_training = False

    def __init__(self, num_features: int, group_size: int = 16,
                 components: tuple[str, ...] | list[str] = COMPONENTS, tie_weight: bool = False,
                 eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, shrinkage: str | float = "auto",
                 method: str = "auto", iterations: int = 5, process_group: Any = None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, group_size, eps, momentum, affine, track_running_stats, device, dtype)
        components = tuple(components) if not isinstance(components, str) else (components,)
        bad = [k for k in components if k not in COMPONENTS]
        if not components or bad or len(set(components)) != len(components):
            raise ValueError(f"components must be distinct names from {', '.join(COMPONENTS)}, "
                             f"got {components!r}")
        check_whitening_options(method, iterations, shrinkage)
        self.components, self.tie_weight = components, bool(tie_weight)
        self.shrinkage, self.method, self.iterations = shrinkage, method, iterations
        self.process_group = process_group
        factory = {"device": device, "dtype": dtype}
        self.mean_weight = nn.Parameter(torch.zeros(len(components), **factory))
        self.cov_weight = None if self.tie_weight else nn.Parameter(torch.zeros(len(components), **factory))

    @property
    def spec(self) -> W.WhiteningSpec:
        return W.WhiteningSpec(self.eps, self.shrinkage, 1.0, "whitening", self.method, self.iterations)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for p in (getattr(self, "mean_weight", None), getattr(self, "cov_weight", None)):
            if p is not None:
                nn.init.zeros_(p)

    def _weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        mean_w = torch.softmax(self.mean_weight.to(dtype), 0)
        cov_w = mean_w if self.cov_weight is None else torch.softmax(self.cov_weight.to(dtype), 0)
        return mean_w, cov_w

    def _batch_statistics(self, xv: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
        """μ_B (G, c), biased Σ_B (G, c, c), the shrinkage ρ (G,) and the count, over the batch
        (and every process in a process group)."""
        spec = self.spec
        if synced(self.process_group):
            shift = (W.grouped_vector(self.running_mean, self._group_size, 0.0) if self.track_running_stats
                     else xv.new_zeros(xv.shape[1:3]))
            mean, cov, count = synced_moments(xv, shift.to(xv.dtype), self.process_group)
            count = float(count)
            xc = xv - mean.unsqueeze(-1)
            rho = W.shrinkage_intensity(cov, xc, spec, count, differentiable=True)
            rho = ranks_mean(torch.as_tensor(rho, dtype=cov.dtype, device=cov.device).expand(xv.shape[1]),
                             self.process_group)
            return mean, cov, rho, count
        mean = xv.mean((0, 3))
        xc = xv - mean.unsqueeze(-1)
        count = W.sample_count(xv)
        cov = (xc @ xc.mT).sum(0) / count
        rho = W.shrinkage_intensity(cov, xc, spec, differentiable=True)
        rho = torch.as_tensor(rho, dtype=cov.dtype, device=cov.device).expand(xv.shape[1])
        return mean, cov, rho, float(count)

    @torch.compiler.disable  # per-sample eigh with a custom backward: eager only
    def _normalize(self, x: Tensor) -> Tensor:
        dtype = EF.stats_dtype(x)
        with EF.autocast_off(x):
            xs = x.to(dtype)
            xv = per_sample_view(xs, self._group_size)
            if self.uses_batch_stats:
                mean, cov, rho, count = self._batch_statistics(xv)
                factor = self.update_factor()
                if self.training and self.track_running_stats:
                    EF.update_running(self.running_mean, mean.flatten()[: self.num_features], factor)
                    EF.update_running(self.running_cov, cov * (count / (count - 1)), factor)
                    EF.update_running(self.running_shrinkage, rho, factor)
            else:
                mean = W.grouped_vector(self.running_mean, self._group_size, 0.0).to(dtype)
                cov, rho = self.running_cov.to(dtype), self.running_shrinkage.to(dtype)
            cov = W.regularize(cov, 0.0, rho)
            layer_var, layer_mean = torch.var_mean(xs.reshape(xs.shape[0], -1), dim=1, correction=0)
            mean_w, cov_w = self._weights(dtype)
            yv = switchable_whiten(xv, mean, cov, layer_mean, layer_var, mean_w, cov_w,
                                   self.components, self.spec)
            y = rearrange(yv, "n g c s -> n (g c) s")[:, : self.num_features].reshape(x.shape)
            return EF.affine_normalize(y, None, None, self.weight, self.bias, 0.0).to(x.dtype)

    def eval_affine(self) -> tuple[Tensor, Tensor]:
        """The eval transform as one affine map (A (C, C), b (C,)) when every component is a batch
        one ("bw", "bn"); per-sample components make eval depend on each input: ValueError."""
        if not self.track_running_stats:
            raise ValueError(f"{type(self).__name__} without running statistics has no eval map")
        per_sample = [k for k in self.components if k not in BATCH_COMPONENTS]
        if per_sample:
            raise ValueError(f"{type(self).__name__}'s eval transform is not an affine map: its "
                             f"components {per_sample} use each sample's own statistics")
        with torch.no_grad():
            dtype = EF.stats_dtype(self.running_cov)
            c = self.num_features
            _, cov_w = self._weights(dtype)
            cov = W.regularize(self.running_cov.to(dtype), 0.0, self.running_shrinkage.to(dtype))
            diag = torch.diag_embed(cov.diagonal(dim1=-2, dim2=-1))
            mixed = sum(cov_w[k] * (cov if name == "bw" else diag) for k, name in enumerate(self.components))
            w = W.whitening_matrix(mixed, 0.0, self.spec)
            a, b = W.affine_map(w, W.grouped_vector(self.running_mean, self._group_size, 0.0).to(dtype),
                                W.grouped_vector(self.weight, self._group_size, 1.0),
                                W.grouped_vector(self.bias, self._group_size, 0.0))
        return torch.block_diag(*a)[:c, :c], b.flatten()[:c]

    def _extra_fields(self) -> dict[str, Any]:
        return {"group_size": self._group_size, "components": self.components,
                "tie_weight": self.tie_weight, **super()._extra_fields(), "shrinkage": self.shrinkage,
                "method": self.method}
