"""What exact ZCA must compute per layer-step, timed against torch's BatchNorm (issue #11).

For each BN-LeNet shape (batch 256 by default), interleaved in one process, medians of --repeats:

- ``bn``: torch.nn.BatchNorm1d/2d forward+backward (the bench's baseline);
- ``eigh``: torch.linalg.eigh of the c×c regularized covariance (float32), the one step of the
  map no cheaper exact method replaces (``warm_start_eigh.py``: a warm start does not converge);
- ``products``: the products exact ZCA cannot skip. (N, C) input: the covariance, y = x Aᵀ, dA,
  dx (two), each an N×c×c GEMM, and W = U S⁻¹ Uᵀ plus the four c×c×c products of the eigh
  backward. Spatial input: the four fused passes of csrc/whiten_cpu.cpp (moments, affine,
  grad_moments, grad_input), each c multiply-adds per value where BN does one;
- ``floor``: (eigh + products) / bn, a lower bound on the bench's ratio before any overhead.

    .venv/bin/python benchmarks/whitening_floor.py --repeats 200
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

SHAPES = [(256, 6, 24, 24), (256, 16, 8, 8), (256, 120), (256, 84)]


def _fc_products(x: torch.Tensor) -> callable:
    n, c = x.shape
    xc = x - x.mean(0)
    g = torch.randn_like(x)
    a = torch.randn(c, c)

    def run() -> None:
        cov = xc.T @ xc
        y = xc @ a.T
        ga = g.T @ xc
        gx = g @ a
        gx += xc @ cov
        w = (a / 2) @ a.T
        t = a.T @ w
        t = t @ a
        t = a @ t
        t @ a.T
        del y, ga
    return run


def _passes(x: torch.Tensor) -> callable:
    from exoticnorm.kernels import whiten_cpu

    kernel = whiten_cpu()
    x3 = x.reshape(x.shape[0], x.shape[1], -1).contiguous()
    c = x.shape[1]
    shift = torch.zeros(1, c)
    a = torch.eye(c).unsqueeze(0).contiguous()
    b = torch.zeros(1, c)
    y = torch.empty_like(x3)
    gy = torch.randn_like(x3)

    def run() -> None:
        kernel.moments(x3, shift, c)
        kernel.affine(x3, a, shift, b, c, y)
        kernel.grad_moments(gy, x3, shift, c)
        kernel.grad_input(gy, x3, a, a, shift, b, c)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; times in µs (medians)")
    print(f"{'shape':<16}{'bn':>8}{'eigh':>8}{'products':>10}{'floor':>8}")
    for shape in SHAPES:
        c = shape[1]
        x = torch.relu(torch.randn(shape) + 0.5)
        xg = torch.randn(shape)
        xr = x.clone().requires_grad_()
        bn = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(c)
        flat = x.movedim(1, -1).reshape(-1, c)
        cov = torch.cov(flat.T) + 1e-3 * torch.eye(c)
        jobs = {
            "bn": lambda: bn(xr).backward(xg),
            "eigh": lambda: torch.linalg.eigh(cov),
            "products": _fc_products(x) if len(shape) == 2 else _passes(x),
        }
        times: dict[str, list[float]] = {k: [] for k in jobs}
        for i in range(args.repeats + 5):
            for k, job in jobs.items():
                t0 = time.perf_counter()
                job()
                if i >= 5:
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        floor = (med["eigh"] + med["products"]) / med["bn"]
        print(f"{'x'.join(map(str, shape)):<16}{med['bn']:>8.0f}{med['eigh']:>8.0f}{med['products']:>10.0f}"
              f"{floor:>7.2f}x")


if __name__ == "__main__":
    main()
