"""``exoticnorm bench-whitening``: block ZCA against IterNorm at C = 64…512.

Times forward+backward (interleaved, same process) and reports how well each whitens:
max |Cov(y) − I| over the diagonal blocks that each method whitens, on moderately
ill-conditioned data (channel correlation ρ^|i−j| with ρ = 0.9, channel scales 1…10).
Candidates: ``block-zca`` (eigh) and ``block-zca`` with 5 Newton–Schulz iterations (IterNorm's
scheme in our code); with ``--iternorm PATH`` also the published IterNorm PyTorch layer
(``iterative_normalization.py`` from its authors' repository, which you supply).
"""

from __future__ import annotations

import importlib.util
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .zca import BlockZCANorm

__all__ = ["run_whitening_bench", "load_iternorm", "correlated_input", "block_whitening_error"]


def load_iternorm(path: str | Path, channels: int, group: int) -> nn.Module:
    """The published IterNorm layer (T=5) from the authors' file at ``path``.

    Its ``running_wm`` buffer is an expanded (stride-0) tensor that current torch refuses to
    write in place when there is more than one group; it is replaced by a contiguous copy,
    which changes nothing else.
    """
    warnings.filterwarnings("ignore", message="This overload of baddbmm is deprecated")
    spec = importlib.util.spec_from_file_location("published_iternorm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    layer = module.IterNorm(channels, num_channels=group, T=5, dim=4, momentum=0.1, affine=True)
    layer.running_wm = layer.running_wm.clone()
    return layer


def correlated_input(n: int, channels: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.arange(channels, dtype=torch.float64)
    corr = 0.9 ** (idx[:, None] - idx[None, :]).abs()
    scales = torch.linspace(1.0, 10.0, channels, dtype=torch.float64)
    chol = torch.linalg.cholesky(corr * scales[:, None] * scales[None, :])
    z = torch.randn(n * h * w, channels, generator=gen, dtype=torch.float64) @ chol.T
    return z.float().reshape(n, h, w, channels).permute(0, 3, 1, 2).contiguous()


def block_whitening_error(y: torch.Tensor, group: int) -> float:
    """max |Cov(y) − I| over the diagonal blocks of size ``group`` (float64)."""
    flat = y.detach().double().transpose(0, 1).reshape(y.shape[1], -1)
    cov = torch.cov(flat, correction=0)
    worst = 0.0
    for s in range(0, y.shape[1], group):
        block = cov[s : s + group, s : s + group]
        worst = max(worst, (block - torch.eye(block.shape[0], dtype=block.dtype)).abs().max().item())
    return worst


def _time(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> float:
    t0 = time.perf_counter()
    layer(x).backward(g)
    return time.perf_counter() - t0


def run_whitening_bench(
    channels: tuple[int, ...] = (64, 128, 256, 512),
    shapes: tuple[tuple[int, int, int], ...] = ((128, 8, 8), (64, 16, 16)),
    group: int = 64,
    iternorm: str | None = None,
    repeats: int = 10,
    echo: Callable[[str], None] = print,
) -> list[dict]:
    torch.set_flush_denormal(True)
    echo(f"torch {torch.__version__}, {torch.get_num_threads()} threads, groups of {group} channels; "
         "time in ms (median of interleaved fwd+bwd), err = max |Cov(y) - I| within groups")
    header = f"{'C':>4} {'N×H×W':>10} | {'eigh ms':>8} {'err':>8} | {'newton5 ms':>10} {'err':>8}"
    if iternorm:
        header += f" | {'IterNorm ms':>11} {'err':>8} | {'eigh/ItN':>8}"
    echo(header)
    rows = []
    for c in channels:
        for n, h, w in shapes:
            x = correlated_input(n, c, h, w).requires_grad_()
            g = torch.randn_like(x)
            layers = {"eigh": BlockZCANorm(c, group_size=group, method="eigh"),
                      "newton5": BlockZCANorm(c, group_size=group, method="newton", iterations=5)}
            if iternorm:
                layers["iternorm"] = load_iternorm(iternorm, c, group)
            errors = {k: block_whitening_error(m(x), group) for k, m in layers.items()}
            times = {k: [] for k in layers}
            for _ in range(repeats + 2):
                for k, m in layers.items():
                    times[k].append(_time(m, x, g))
            ms = {k: statistics.median(v[2:]) * 1e3 for k, v in times.items()}
            row = {"channels": c, "shape": [n, c, h, w], "ms": ms, "error": errors}
            line = (f"{c:>4} {f'{n}×{h}×{w}':>10} | {ms['eigh']:8.2f} {errors['eigh']:8.1e} | "
                    f"{ms['newton5']:10.2f} {errors['newton5']:8.1e}")
            if iternorm:
                row["eigh_over_iternorm"] = ms["eigh"] / ms["iternorm"]
                line += f" | {ms['iternorm']:11.2f} {errors['iternorm']:8.1e} | {row['eigh_over_iternorm']:7.2f}x"
            echo(line)
            rows.append(row)
    return rows
