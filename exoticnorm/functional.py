"""The math of exoticnorm's norms as pure functions: no modules, no parameters of their own.

Every function takes channels-first input ``(N, C, *spatial)`` (zero to three spatial dims)
and returns a tensor of the input's shape and dtype. Statistics of float16/bfloat16 input are
computed in float32 (``stats_dtype``); float32 and float64 stay as they are.
"""

from __future__ import annotations

import contextlib

import torch
from einops import rearrange
from torch import Tensor

__all__ = [
    "stats_dtype",
    "autocast_off",
    "refuse_double_backward",
    "channel_dims",
    "values_per_channel",
    "per_channel",
    "affine_normalize",
    "batch_moments",
    "update_running",
    "update_all_running",
    "batch_norm",
    "group_norm",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def stats_dtype(x: Tensor) -> torch.dtype:
    """float32 for float16/bfloat16 input, else the input's own dtype."""
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def autocast_off(x: Tensor):
    """A context with autocast off on ``x``'s device (a no-op where autocast does not exist,
    such as the meta device)."""
    kind = x.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def refuse_double_backward(what: str, hint: str) -> None:
    """Inside a custom backward: raise if it runs with create_graph=True (grad mode on), for a
    backward that is not itself differentiable, instead of returning a wrong second derivative."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{what} not twice differentiable: double backward (create_graph=True, "
                           f"e.g. a gradient penalty) is not supported; {hint}")


def channel_dims(x: Tensor) -> list[int]:
    """The dims a batch statistic reduces over: every dim but the channel dim 1."""
    return [0, *range(2, x.ndim)]


def values_per_channel(x: Tensor) -> int:
    """n = N · prod(spatial): how many values one channel's batch statistics see."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


def per_channel(v: Tensor, ndim: int) -> Tensor:
    """Shape a (C,) vector to broadcast against (N, C, *spatial) of rank ``ndim``."""
    return v.reshape(1, -1, *([1] * (ndim - 2)))


def affine_normalize(
    x: Tensor,
    mean: Tensor | None,
    var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """y = (x − mean) / sqrt(var + eps) · weight + bias, all four per channel (C,).

    ``mean=None`` skips the centring, ``var=None`` the scaling, ``weight``/``bias=None`` the
    affine. Folded into one multiply-add per element: y = x · s + t.
    """
    dtype = stats_dtype(x)
    scale = None
    if var is not None:
        scale = torch.rsqrt(var.to(dtype) + eps)
    if weight is not None:
        scale = weight.to(dtype) if scale is None else scale * weight.to(dtype)
    shift = None
    if mean is not None:
        shift = -mean.to(dtype) if scale is None else -mean.to(dtype) * scale
    if bias is not None:
        shift = bias.to(dtype) if shift is None else shift + bias.to(dtype)
    y = x.to(dtype)
    if scale is not None:
        y = y * per_channel(scale, x.ndim)
    if shift is not None:
        y = y + per_channel(shift, x.ndim)
    return y.to(x.dtype)


def batch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance over every dim but C, in ``stats_dtype``."""
    var, mean = torch.var_mean(x.to(stats_dtype(x)), dim=channel_dims(x), correction=0)
    return mean, var


@torch.no_grad()
def update_running(running: Tensor | None, batch_value: Tensor, factor: float) -> None:
    """running ← (1 − factor) · running + factor · batch_value, in place, outside autograd."""
    if running is not None:
        running.lerp_(batch_value.detach().to(running.dtype), factor)


def update_all_running(running: tuple[Tensor, ...], batch_values: tuple[Tensor, ...], factor: float) -> None:
    """``update_running`` for several buffers at once (one fused call)."""
    with torch.no_grad():
        values = [v if v.dtype == r.dtype else v.to(r.dtype) for r, v in zip(running, batch_values)]
        torch._foreach_lerp_(list(running), values, factor)


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    center: bool = True,
    scale: bool = True,
) -> Tensor:
    """Batch normalization, written out: y = (x − μ) / sqrt(σ² + eps) · γ + β.

    training (or no running buffers): μ, σ² are the batch mean and biased variance over every
    dim but C, and each given running buffer moves by ``momentum``:
    r ← (1 − m) r + m · stat, with the unbiased variance σ² · n / (n − 1) for ``running_var``.
    eval: μ, σ² are the running buffers.

    The d2l "lite" variants drop one half: ``center=False`` gives y = x / sqrt(σ² + eps) · γ + β,
    ``scale=False`` gives y = (x − μ) · γ + β.
    """
    use_batch = training or (
        (center and running_mean is None) or (scale and running_var is None)
    )
    if not use_batch:
        return affine_normalize(
            x, running_mean if center else None, running_var if scale else None, weight, bias, eps
        )
    n = values_per_channel(x)
    if n <= 1 and scale:
        raise ValueError(
            f"batch_norm needs more than 1 value per channel in training, got input of shape "
            f"{tuple(x.shape)}; use a batch of at least 2 samples or evaluate in eval mode"
        )
    mean, var = batch_moments(x)
    if training:
        if center:
            update_running(running_mean, mean, momentum)
        if scale:
            update_running(running_var, var * (n / (n - 1)), momentum)
    return affine_normalize(x, mean if center else None, var if scale else None, weight, bias, eps)


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Per sample and per group of C / G channels: y = (x − μ_ng) / sqrt(σ²_ng + eps) · γ_c + β_c.

    G = 1 is LayerNorm over (C, *spatial); G = C is InstanceNorm. Moments are biased.
    """
    grouped = rearrange(x.to(stats_dtype(x)), "n (g c) ... -> n g (c ...)", g=num_groups)
    var, mean = torch.var_mean(grouped, dim=-1, keepdim=True, correction=0)
    y = ((grouped - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    return affine_normalize(y, None, None, weight, bias, eps).to(x.dtype)
