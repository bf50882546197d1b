"""``exoticnorm bench-sketch``: QuantileSketch against KLL (Apache DataSketches) and PIT speed.

Accuracy: streams of 1,500 batches × 256 values (normal, bimodal, lognormal), cumulative
mode; the error is max |F_sketch − F_pooled| against the exact pooled ECDF, checked on both
sides of every jump. KLL (k = 200, the ``datasketches`` package, optional) sees the same
values. Speed: sketch updates in values/s, both in the same process.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from .sketch import QuantileSketch

__all__ = ["run_sketch_bench"]


def _stream(kind: str, batches: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((batches, size))
    if kind == "bimodal":
        return np.where(rng.random((batches, size)) < 0.5, 0.5 * z - 2, 0.5 * z + 2).astype(np.float32)
    if kind == "lognormal":
        return np.exp(z).astype(np.float32)
    return z.astype(np.float32)


def _sup_error(cdf_at: Callable[[np.ndarray], np.ndarray], values: np.ndarray) -> float:
    """max |F − ECDF| over the line: at every distinct value, against both sides of its jump."""
    xs, counts = np.unique(values.ravel(), return_counts=True)
    right = np.cumsum(counts) / values.size
    f = cdf_at(xs.astype(np.float64))
    return float(max(np.abs(f - right).max(), np.abs(f - (right - counts / values.size)).max()))


def run_sketch_bench(batches: int = 1500, size: int = 256, bins: int = 500,
                     echo: Callable[[str], None] = print) -> dict:
    torch.set_flush_denormal(True)
    try:
        import datasketches
    except ImportError:
        datasketches = None
    probe = QuantileSketch(1, bins=bins)
    per_channel = sum(b.element_size() * b.numel() for b in probe.buffers())
    echo(f"QuantileSketch(bins={bins}): about {per_channel} bytes per channel; "
         f"KLL k=200: {'datasketches' if datasketches else 'not installed (pip install datasketches)'}")
    echo(f"{'stream':<10} {'ours max|F-F_pooled|':>22} {'KLL max|F-F_pooled|':>22} {'KLL bytes':>10}")
    results: dict = {"accuracy": {}}
    for kind in ("normal", "bimodal", "lognormal"):
        data = _stream(kind, batches, size)
        sketch = QuantileSketch(1, bins=bins, momentum=None)
        for b in data:
            sketch.update(torch.from_numpy(b)[None])
        ours = _sup_error(lambda xs: sketch.cdf_at(torch.from_numpy(xs).float()[None])[0].double().numpy(), data)
        row = {"ours": ours}
        line = f"{kind:<10} {ours:>22.2e}"
        if datasketches:
            kll = datasketches.kll_floats_sketch(200)
            for b in data:
                kll.update(b)
            row["kll"] = _sup_error(lambda xs: np.array(kll.get_cdf(xs.tolist()))[:-1], data)
            row["kll_bytes"] = len(kll.serialize())
            line += f" {row['kll']:>22.2e} {row['kll_bytes']:>10}"
        results["accuracy"][kind] = row
        echo(line)
    x = torch.randn(64, 16384)
    sketch = QuantileSketch(64, bins=bins, momentum=0.01)
    sketch.update(x)
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        sketch.update(x)
    rate = x.numel() * reps / (time.perf_counter() - t0)
    results["ours_values_per_sec"] = rate
    line = f"update speed: ours {rate / 1e6:.1f} M values/s (64 channels × 16384 values per update)"
    if datasketches:
        values = x[0].numpy()
        kll = datasketches.kll_floats_sketch(200)
        t0 = time.perf_counter()
        for _ in range(reps * 64):
            kll.update(values)
        kll_rate = values.size * reps * 64 / (time.perf_counter() - t0)
        results["kll_values_per_sec"] = kll_rate
        line += f"; KLL {kll_rate / 1e6:.1f} M values/s (one sketch per channel)"
    echo(line)
    return results
