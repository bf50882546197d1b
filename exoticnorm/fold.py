"""Fold eval-mode norms into the conv/linear layer before them, for inference.

A norm whose eval transform is affine, y = A x + b on each (C,) vector (``eval_affine()``: bn
and its variants, running-bn, the ZCA family with any ``transform``, monarch-zca,
circulant-zca, and switchable-whitening when all its components are batch ones; the others
raise a ValueError that says why), directly after a Conv1d/2d/3d or Linear that
feeds nothing else, is folded into it: W' = A W (over output channels), b' = A b_layer + b, and
the norm becomes ``nn.Identity``. A dense A (whitening) needs an ungrouped layer; a diagonal
one folds into grouped and depthwise convs too.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .base import Norm

__all__ = ["fold_norms"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _pairs_by_graph(model: nn.Module) -> tuple[list[tuple[str, str]], list[tuple[str, str]]] | None:
    """(layer, norm) names joined in the traced graph, and (norm, reason) for the norms that
    are not; None when the model cannot be traced symbolically."""
    import torch.fx as fx

    class Tracer(fx.Tracer):  # exoticnorm's norms (and torch's layers) stay single nodes
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, Norm) or super().is_leaf_module(m, qualname)

    try:
        graph = Tracer().trace(model)
    except Exception:  # noqa: BLE001 - data-dependent control flow: fall back to containers
        return None
    modules = dict(model.named_modules())
    pairs, left = [], []
    for node in graph.nodes:
        if node.op != "call_module" or not hasattr(modules[node.target], "eval_affine"):
            continue
        prev = node.args[0] if node.args else None
        if not (isinstance(prev, fx.Node) and prev.op == "call_module"
                and isinstance(modules[prev.target], _LAYERS)):
            left.append((node.target, "not directly after a conv or linear layer"))
        elif len(prev.users) != 1:
            left.append((node.target, f"{prev.target}'s output also feeds other layers"))
        else:
            pairs.append((prev.target, node.target))
    return pairs, left


def _pairs_in_sequences(model: nn.Module) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(layer, norm) neighbours inside nn.Sequential containers (when the model cannot be traced)."""
    pairs, left = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for i, (child, norm) in enumerate(children):
            if not hasattr(norm, "eval_affine"):
                continue
            full = f"{name}.{child}" if name else child
            if i and isinstance(children[i - 1][1], _LAYERS):
                before = children[i - 1][0]
                pairs.append((f"{name}.{before}" if name else before, full))
            else:
                left.append((full, "not directly after a conv or linear layer in a Sequential"))
    return pairs, left


@torch.no_grad()
def _fold_into(layer: nn.Module, a: Tensor, b: Tensor) -> None:
    w = layer.weight.double()  # the product in float64, rounded once
    a, b = a.double(), b.double()
    if isinstance(layer, nn.Linear):
        new_w = a @ w
    else:
        new_w = torch.einsum("oc,c...->o...", a, w) if layer.groups == 1 else a.diagonal().view(
            -1, *[1] * (w.ndim - 1)) * w
    old_b = layer.bias.double() if layer.bias is not None else torch.zeros_like(b)
    layer.weight.copy_(new_w)
    if layer.bias is None:
        layer.bias = nn.Parameter(layer.weight.new_zeros(layer.weight.shape[0]))
    layer.bias.copy_(a @ old_b + b)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def fold_norms(model: nn.Module) -> tuple[nn.Module, list[tuple[str, str]]]:
    """An inference copy of ``model`` in eval mode with every foldable norm folded into the
    conv/linear layer before it (the norm replaced by ``nn.Identity``), and the norms left in
    place as (name, reason). Outputs equal the unfolded eval model's up to rounding.

    Left in place: norms without an affine eval map (PIT, gn/ln/in and group-whitening, which
    are per-sample, switchable-whitening with per-sample components),
    norms without running statistics, norms not directly after a conv/linear layer (after an
    activation, say), a layer whose output also feeds something else, and a dense whitening
    map after a grouped conv.
    """
    folded = copy.deepcopy(model).eval()
    found = _pairs_by_graph(folded)
    pairs, left = found if found is not None else _pairs_in_sequences(folded)
    modules = dict(folded.named_modules())
    for layer_name, norm_name in pairs:
        layer, norm = modules[layer_name], modules[norm_name]
        try:
            a, b = norm.eval_affine()
        except (ValueError, RuntimeError) as err:
            left.append((norm_name, str(err)))
            continue
        diagonal = torch.equal(a, torch.diag(a.diagonal()))
        if not isinstance(layer, nn.Linear) and layer.groups != 1 and not diagonal:
            left.append((norm_name, f"a dense whitening map cannot fold into grouped {layer_name}"))
            continue
        _fold_into(layer, a, b)
        _set(folded, norm_name, nn.Identity())
    done = {n for n, m in folded.named_modules()}  # norms replaced by Identity are gone
    listed = {n for n, _ in left}
    for n, m in modules.items():
        if isinstance(m, Norm) and n in done and isinstance(folded.get_submodule(n), Norm) and n not in listed:
            why = "its eval transform is not an affine map" if not hasattr(m, "eval_affine") else \
                "not directly after a conv or linear layer"
            left.append((n, why))
    return folded, left
