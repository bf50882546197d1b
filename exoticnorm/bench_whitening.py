"""``exoticnorm bench-whitening``: every whitening variant (and IterNorm) on time and whitening error.

One table, one row per (C, variant), at C = 64, 256, 1024 by default. Columns:

- ms: forward+backward in training mode, median of interleaved repeats in one process;
- err: max |Cov(y) − I| over the whole C×C output covariance, on moderately ill-conditioned
  data (channel correlation ρ^|i−j| with ρ = 0.9, channel scales 1…10; ``correlated_input``);
- block: the same over the diagonal blocks of ``group`` channels only (what block-zca and
  IterNorm set out to whiten);
- off: max |Cov(y)_ij| for i, j in different blocks of ``group`` (the correlation that
  block-diagonal whitening leaves; after a full whitening it is ~0);
- circ: max |Cov(y) − I| on data whose covariance is circulant (``circulant_input``), the
  structure ``circulant-zca`` assumes.

Errors are in-sample (the whitened batch's own covariance, float64). Variants: zca (eigh),
zca with Cholesky and PCA transforms, block-zca (groups of ``group``; eigh and 5 Newton–Schulz
steps, IterNorm's scheme), monarch-zca (block ≈ √C; ZCA and PCA stages), circulant-zca,
group-whitening and switchable-whitening (per-sample statistics: not meant to whiten the
batch, listed for time), and with ``iternorm`` the published IterNorm layer
(``iterative_normalization.py`` from its authors' repository, which you supply).

With ``lenet_steps`` > 0 and FashionMNIST on disk, a second table: the error each variant
leaves on real activations (where the circulant assumption need not hold), the inputs of
the conv2 (C = 16) and fc1 (C = 120) norms of a d2l BN-LeNet trained for ``lenet_steps`` SGD
steps, on 2048 test images.
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

from .registry import create_norm

__all__ = ["run_whitening_bench", "load_iternorm", "correlated_input", "circulant_input",
           "block_whitening_error", "whitening_errors", "variants", "lenet_activations"]


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


def _as_images(z: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    return z.float().reshape(n, h, w, -1).permute(0, 3, 1, 2).contiguous()


def correlated_input(n: int, channels: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(n, C, h, w) with channel correlation 0.9^|i−j| and channel scales 1…10."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.arange(channels, dtype=torch.float64)
    corr = 0.9 ** (idx[:, None] - idx[None, :]).abs()
    scales = torch.linspace(1.0, 10.0, channels, dtype=torch.float64)
    chol = torch.linalg.cholesky(corr * scales[:, None] * scales[None, :])
    z = torch.randn(n * h * w, channels, generator=gen, dtype=torch.float64) @ chol.T
    return _as_images(z, n, h, w)


def circulant_input(n: int, channels: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(n, C, h, w) with a circulant channel covariance, Σ_ij = 0.9^d + 0.5·[i = j],
    d = min(|i − j|, C − |i − j|) (wrapped AR(1)), drawn by an FFT over channels."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.arange(channels, dtype=torch.float64)
    r = 0.9 ** torch.minimum(k, channels - k) + 0.5 * (k == 0)
    lam = torch.fft.rfft(r).real.clamp_min(0)
    z = torch.randn(n * h * w, channels, generator=gen, dtype=torch.float64)
    return _as_images(torch.fft.irfft(torch.fft.rfft(z, dim=1) * lam.sqrt(), n=channels, dim=1), n, h, w)


def _cov(y: torch.Tensor) -> torch.Tensor:
    flat = y.detach().double().transpose(0, 1).reshape(y.shape[1], -1)
    return torch.cov(flat, correction=0)


def block_whitening_error(y: torch.Tensor, group: int) -> float:
    """max |Cov(y) − I| over the diagonal blocks of size ``group`` (float64)."""
    return whitening_errors(y, group)["block"]


def whitening_errors(y: torch.Tensor, group: int) -> dict[str, float]:
    """max |Cov(y) − I| overall ("err") and within diagonal blocks of ``group`` ("block"), and
    max |Cov(y)_ij| between blocks ("off"), all in float64."""
    cov = _cov(y)
    c = cov.shape[0]
    dev = (cov - torch.eye(c, dtype=cov.dtype)).abs()
    block_id = torch.arange(c) // group
    same = block_id[:, None] == block_id[None, :]
    off = dev[~same].max().item() if (~same).any() else 0.0
    return {"err": dev.max().item(), "block": dev[same].max().item(), "off": off}


def variants(channels: int, group: int, iternorm: str | None = None) -> dict[str, Callable[[], nn.Module]]:
    """Label → factory of every whitening variant at ``channels``."""
    out = {
        "zca": lambda: create_norm("zca", channels, method="eigh"),
        "zca cholesky": lambda: create_norm("zca", channels, transform="cholesky"),
        "zca pca": lambda: create_norm("zca", channels, transform="pca"),
        f"block-zca {group}": lambda: create_norm("block-zca", channels, group_size=group, method="eigh"),
        f"block-zca {group} newton5": lambda: create_norm("block-zca", channels, group_size=group,
                                                          method="newton", iterations=5),
        "monarch-zca": lambda: create_norm("monarch-zca", channels),
        "monarch-zca pca": lambda: create_norm("monarch-zca", channels, transform="pca"),
        "circulant-zca": lambda: create_norm("circulant-zca", channels),
        "group-whitening": lambda: create_norm("group-whitening", channels),
        "switchable-whitening": lambda: create_norm("switchable-whitening", channels),
    }
    if iternorm:
        out[f"IterNorm {group}"] = lambda: load_iternorm(iternorm, channels, group)
    return out


def _time(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    layer(x).backward(g)
    sync()
    return time.perf_counter() - t0


def run_whitening_bench(
    channels: tuple[int, ...] = (64, 256, 1024),
    shapes: tuple[tuple[int, int, int], ...] = ((64, 8, 8),),
    group: int = 64,
    iternorm: str | None = None,
    repeats: int = 5,
    lenet_steps: int = 0,
    echo: Callable[[str], None] = print,
    device: torch.device | str = "cpu",
) -> list[dict]:
    """Print the table (module docstring) and return its rows as dicts; the whitening table on
    ``device`` (errors in float64 on the host)."""
    torch.set_flush_denormal(True)
    device = torch.device(device)
    echo(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads; ms = median fwd+bwd of "
         f"{repeats} interleaved runs; err = max|Cov(y) − I|, block/off = within/between blocks "
         f"of {group} channels, circ = err on circulant-covariance data")
    echo(f"{'C':>5} {'N×H×W':>8} {'variant':<26} | {'ms':>8} {'×zca':>6} | {'err':>8} {'block':>8} "
         f"{'off':>8} | {'circ':>8}")
    rows = []
    for c in channels:
        for n, h, w in shapes:
            x = correlated_input(n, c, h, w).to(device).requires_grad_()
            xcirc = circulant_input(n, c, h, w, seed=1).to(device)
            g = torch.randn_like(x)
            factories = variants(c, min(group, c), iternorm)
            layers = {k: f().to(device) for k, f in factories.items()}
            errors = {}
            for k, m in layers.items():
                errors[k] = whitening_errors(m(x).cpu(), min(group, c))
                errors[k]["circ"] = whitening_errors(factories[k]().to(device)(xcirc).cpu(), c)["err"]
            times = {k: [] for k in layers}
            for _ in range(repeats + 2):
                for k, m in layers.items():
                    times[k].append(_time(m, x, g))
            ms = {k: statistics.median(v[2:]) * 1e3 for k, v in times.items()}
            for k in layers:
                e = errors[k]
                row = {"channels": c, "shape": [n, c, h, w], "variant": k, "ms": ms[k],
                       "over_zca": ms[k] / ms["zca"], **e}
                echo(f"{c:>5} {f'{n}×{h}×{w}':>8} {k:<26} | {ms[k]:8.2f} {row['over_zca']:6.2f} | "
                     f"{e['err']:8.1e} {e['block']:8.1e} {e['off']:8.1e} | {e['circ']:8.1e}")
                rows.append(row)
    if lenet_steps > 0:
        rows += _lenet_table(lenet_steps, echo)
    return rows


def lenet_activations(steps: int, images: int = 2048, seed: int = 0) -> dict[str, torch.Tensor] | None:
    """Inputs of the conv2 and fc1 norms of a d2l BN-LeNet after ``steps`` SGD steps (lr 0.1,
    batch 128) on FashionMNIST, on the first ``images`` test images; None without the data."""
    from .data import DatasetNotFound, load_fashion_mnist
    from .models.lenet import LeNet

    try:
        data = load_fashion_mnist(download=False, limit_test=images)
    except DatasetNotFound:
        return None
    torch.manual_seed(seed)
    model = LeNet(norm="bn")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(data.train_x), (128,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.train_x[idx]), data.train_y[idx]).backward()
        opt.step()
    found = {}
    hooks = [getattr(model.net, f"norm_{site}").register_forward_pre_hook(
        lambda _m, args, site=site: found.__setitem__(site, args[0].detach())) for site in ("conv2", "fc1")]
    model.eval()
    with torch.no_grad():
        model(data.test_x)
    for h in hooks:
        h.remove()
    return found


def _lenet_table(steps: int, echo: Callable[[str], None]) -> list[dict]:
    acts = lenet_activations(steps)
    if acts is None:
        echo("(no FashionMNIST found: the LeNet-activation table is skipped)")
        return []
    echo(f"\nmax|Cov(y) − I| on BN-LeNet activations after {steps} SGD steps (2048 test images; "
         "block-zca with blocks of monarch-zca's block size)")
    echo(f"{'variant':<26} | {'conv2 C=16':>10} {'fc1 C=120':>10}")
    from .structured import default_block_size

    rows = []
    results: dict[str, dict[str, float]] = {}
    for site, x in acts.items():
        c = x.shape[1]
        b = default_block_size(c)
        factories = {k: f for k, f in variants(c, b).items() if "newton" not in k}
        for k, factory in factories.items():
            label = k.replace(f" {b}", " √C")
            with torch.no_grad():
                results.setdefault(label, {})[site] = whitening_errors(factory()(x), b)["err"]
    for label, errs in results.items():
        echo(f"{label:<26} | {errs['conv2']:10.1e} {errs['fc1']:10.1e}")
        rows.append({"lenet_steps": steps, "variant": label, **{f"{k}_err": v for k, v in errs.items()}})
    return rows
