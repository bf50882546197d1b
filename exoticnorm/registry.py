"""Norms by name: ``register_norm``, ``create_norm``, ``available_norms``, ``convert_norms``.

Every registered factory takes the channel count first: ``factory(num_features, **options)``.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "NormConfigError",
    "register_norm",
    "available_norms",
    "describe_norms",
    "norm_options",
    "create_norm",
    "convert_norms",
]


class NormConfigError(ValueError):
    """An unknown norm name or option; the message lists the valid ones."""


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    description: str


_REGISTRY: dict[str, _Entry] = {}


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0].strip() if (doc or "").strip() else ""


def register_norm(name: str, *, description: str | None = None, overwrite: bool = False):
    """Decorator: register a norm class or factory ``f(num_features, **options)`` under ``name``.

    The description (shown by ``exoticnorm norms``) defaults to the docstring's first line.
    """
    if not isinstance(name, str) or not name:
        raise NormConfigError(f"a norm name must be a non-empty string, got {name!r}")

    def decorator(factory):
        if name in _REGISTRY and not overwrite and _REGISTRY[name].factory is not factory:
            raise NormConfigError(
                f"a norm named {name!r} is already registered ({_REGISTRY[name].factory!r}); "
                "pick another name or pass overwrite=True"
            )
        _REGISTRY[name] = _Entry(factory, description or _first_line(factory.__doc__))
        return factory

    return decorator


def available_norms() -> list[str]:
    """Registered norm names, in registration order."""
    return list(_REGISTRY)


def describe_norms() -> dict[str, str]:
    """name → one-line description."""
    return {name: entry.description for name, entry in _REGISTRY.items()}


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise NormConfigError(
            f"unknown norm {name!r}.{hint} Registered norms: {', '.join(_REGISTRY)}"
        )
    return _REGISTRY[name]


def norm_options(name: str) -> dict[str, inspect.Parameter]:
    """The keyword options of norm ``name`` (everything but ``num_features``)."""
    params = inspect.signature(_entry(name).factory).parameters
    return {
        k: p
        for k, p in list(params.items())[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _check_options(name: str, kwargs: dict[str, Any]) -> None:
    factory = _entry(name).factory
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    valid = norm_options(name)
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise NormConfigError(
                f"norm {name!r} has no option {key!r}.{hint} "
                f"Its options: {', '.join(valid) or '(none)'}"
            )


def create_norm(name: str, num_features: int, **kwargs: Any) -> nn.Module:
    """Build the norm registered as ``name`` for ``num_features`` channels."""
    _check_options(name, kwargs)
    return _entry(name).factory(num_features, **kwargs)


# --- conversion -----------------------------------------------------------------------------

_TORCH_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_TORCH_BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _convertible_types() -> set[type]:
    types = set(_TORCH_BATCHNORMS)
    types.update(e.factory for e in _REGISTRY.values() if isinstance(e.factory, type))
    return types


def _shared_state(source: nn.Module) -> tuple[str, ...]:
    if type(source) in _TORCH_BATCHNORMS:
        return _TORCH_BN_STATE
    return tuple(getattr(source, "_convertible_state", ()))


_CARRIED_OPTIONS = ("eps", "momentum", "affine", "track_running_stats")


def _convert_one(source: nn.Module, to: str, kwargs: dict[str, Any]) -> nn.Module:
    valid = norm_options(to)
    accepted = inspect.signature(type(source).__init__).parameters  # options the source was built with
    carried = {k: getattr(source, k) for k in _CARRIED_OPTIONS
               if k in valid and k in accepted and k not in kwargs and hasattr(source, k)}
    target = create_norm(to, source.num_features, **{**carried, **kwargs})
    floats = [t for t in (*source.parameters(False), *source.buffers(False)) if t.is_floating_point()]
    if floats and not {"device", "dtype"} & kwargs.keys():
        target.to(device=floats[0].device, dtype=floats[0].dtype)
    wanted = set(_shared_state(source)) & set(getattr(target, "_convertible_state", ()))
    source_state = source.state_dict()
    target_state = target.state_dict()
    with torch.no_grad():
        for key in wanted:
            src, dst = source_state.get(key), target_state.get(key)
            if src is not None and dst is not None and src.shape == dst.shape:
                dst.copy_(src)
    target.train(source.training)
    return target


def convert_norms(model: nn.Module, to: str, **kwargs: Any) -> nn.Module:
    """Replace every torch BatchNorm1d/2d/3d/SyncBatchNorm and every exoticnorm norm in
    ``model`` by norm ``to`` built with ``kwargs``, and return the new root.

    Exact types are matched (a subclass of BatchNorm2d is left alone, not silently dropped).
    Device, dtype and train/eval mode are kept, and so are the source's eps, momentum, affine
    and track_running_stats where the new norm has them (``kwargs`` override); γ, β (and
    running statistics between batch norms) are copied where both norms hold them with the
    same meaning and shape.
    """
    _entry(to)
    _check_options(to, kwargs)
    types = _convertible_types()
    if type(model) in types:
        return _convert_one(model, to, kwargs)
    for name, child in model.named_children():
        new = convert_norms(child, to, **kwargs)
        if new is not child:
            setattr(model, name, new)
    return model
