"""``exoticnorm bench``: each norm against torch.nn.BatchNorm, timed in the same process.

Two measurements, both printed as ratios to a baseline timed in the same run, interleaved
round by round so that machine noise hits both alike:
- forward+backward of one layer at the BN-LeNet shapes (batch 256), time / torch's time;
- LeNet training steps (batch 128, SGD), images/s / a LeNet with torch's BatchNorm1d/2d.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import InputError
from .models import LeNet
from .registry import create_norm
from .train import pick_device

__all__ = ["run_bench", "LENET_SHAPES", "torch_batchnorm_lenet"]

LENET_SHAPES = [(256, 6, 24, 24), (256, 16, 8, 8), (256, 120), (256, 84)]
_TORCH_BN = {2: nn.BatchNorm1d, 4: nn.BatchNorm2d}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fwd_bwd(module: nn.Module, x: torch.Tensor, g: torch.Tensor, device) -> float:
    t0 = time.perf_counter()
    module(x).backward(g)
    _sync(device)
    return time.perf_counter() - t0


def torch_batchnorm_lenet(**kwargs) -> LeNet:
    """The baseline: a LeNet whose norms are torch.nn.BatchNorm2d (conv) and BatchNorm1d (fc)."""
    model = LeNet(norm="bn", **kwargs)
    for site, norm in model.norms().items():
        kind = nn.BatchNorm2d if site.startswith("conv") else nn.BatchNorm1d
        setattr(model.net, f"norm_{site}", kind(norm.num_features))
    return model


def _layer_ratios(name: str, repeats: int, device) -> dict[str, float | None]:
    ratios = {}
    for shape in LENET_SHAPES:
        x = torch.randn(shape, device=device, requires_grad=True)
        g = torch.randn(shape, device=device)
        base = _TORCH_BN[len(shape)](shape[1]).to(device)
        ours = create_norm(name, shape[1]).to(device)
        try:
            ours(x)
        except InputError:
            ratios["x".join(map(str, shape))] = None
            continue
        t_base, t_ours = [], []
        for _ in range(repeats + 3):
            t_base.append(_fwd_bwd(base, x, g, device))
            t_ours.append(_fwd_bwd(ours, x, g, device))
        ratios["x".join(map(str, shape))] = statistics.median(t_ours[3:]) / statistics.median(t_base[3:])
    return ratios


def _train_rates(models: dict[str, nn.Module], steps: int, device, rounds: int = 10) -> dict[str, float]:
    x = torch.rand(128, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in models.items()}
    elapsed = {k: 0.0 for k in models}

    def step(k: str) -> None:
        loss = F.cross_entropy(models[k](x), y)
        opts[k].zero_grad(set_to_none=True)
        loss.backward()
        opts[k].step()

    for k in models:  # warm-up
        for _ in range(3):
            step(k)
    per_round = max(steps // rounds, 1)
    for _ in range(rounds):
        for k in models:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(per_round):
                step(k)
            _sync(device)
            elapsed[k] += time.perf_counter() - t0
    return {k: 128 * per_round * rounds / t for k, t in elapsed.items()}


def run_bench(
    names: list[str],
    repeats: int = 30,
    train_steps: int = 30,
    device: str = "auto",
    echo: Callable[[str], None] = print,
) -> dict:
    dev = pick_device(device)
    if dev.type == "cpu":
        torch.set_flush_denormal(True)
    torch.manual_seed(0)
    echo(f"device {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
         "ratios < 1 are faster than torch (time), > 1 faster (images/s)")
    shapes = ["x".join(map(str, s)) for s in LENET_SHAPES]
    echo(f"{'norm':<12}" + "".join(f"{s:>16}" for s in shapes) + f"{'LeNet img/s':>14}{'ratio':>8}")
    results: dict = {"device": str(dev), "torch": torch.__version__, "norms": {}}
    for name in names:
        layer = _layer_ratios(name, repeats, dev)
        row = {"fwd_bwd_time_ratio": layer}
        if train_steps:
            try:
                candidate = LeNet(norm=name).to(dev)
                candidate(torch.rand(2, 1, 28, 28, device=dev))
                layers = "all"
            except InputError:  # e.g. InstanceNorm has nothing to normalize in the fc layers
                candidate, layers = LeNet(norm=name, norm_layers="conv").to(dev), "conv"
            rates = _train_rates({"torch": torch_batchnorm_lenet().to(dev), name: candidate},
                                 train_steps, dev)
            row.update(lenet_images_per_sec=rates[name], torch_images_per_sec=rates["torch"],
                       lenet_speed_ratio=rates[name] / rates["torch"], norm_layers=layers)
        results["norms"][name] = row
        cells = "".join(f"{'n/a':>16}" if v is None else f"{v:>15.2f}x" for v in layer.values())
        tail = (f"{row['lenet_images_per_sec']:>14.0f}{row['lenet_speed_ratio']:>7.2f}x"
                + (" (conv only)" if row["norm_layers"] == "conv" else "")) if train_steps else ""
        echo(f"{name:<12}{cells}{tail}")
    return results
