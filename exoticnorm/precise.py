"""Precise eval statistics: recompute running statistics with the current weights.

Running averages taken during training lag behind the weights, and each layer's statistics
were gathered on inputs shaped by the layers before it in training mode. For batch norm the
effect is small; a whitening norm's eval transform amplifies it along its small-variance
directions (measured here: a ZCA-LeNet at 0.38 eval accuracy scored 0.88 after this). The
remedy is "precise BN" (Wu & Johnson, 2021): average the statistics cumulatively over some
batches with the final weights, forward only, before evaluating.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

__all__ = ["precise_statistics"]


@torch.no_grad()
def precise_statistics(model: nn.Module, batches: Iterable[Tensor], only_flagged: bool = True) -> int:
    """Recompute the running statistics of the norms in ``model`` from ``batches``.

    Norms are those with running statistics and, when ``only_flagged``, ``precise_eval`` set
    (whitening, PIT); norms without a cumulative mode (``cumulative = False``) are skipped. Their statistics are reset and averaged cumulatively over the batches in
    training mode; every other module runs in eval mode (no dropout). Returns how many norms
    were recomputed (0: no such norms or no batches; then nothing changed).
    """
    norms = [m for m in model.modules()
             if getattr(m, "track_running_stats", False) and hasattr(m, "reset_running_stats")
             and getattr(m, "cumulative", True)
             and (getattr(m, "precise_eval", False) or not only_flagged)]
    if not norms:
        return 0
    batches = iter(batches)
    first = next(batches, None)
    if first is None:  # nothing to recompute from: keep the statistics as they are
        return 0
    was_training = model.training
    momenta = [n.momentum for n in norms]
    model.eval()
    for n in norms:
        n.reset_running_stats()
        n.momentum = None
        n.train()
    try:
        model(first)
        for x in batches:
            model(x)
    finally:
        for n, momentum in zip(norms, momenta):
            n.momentum = momentum
        model.train(was_training)
    return len(norms)
