"""The options for ZCA's c×c map on a GPU (issue #11), timed and checked on batches (G, c, c):

- device: torch.linalg.eigh on the GPU (cusolver), then W = U diag(λ^(-1/2)) Uᵀ;
- host:   the same eigh on the host CPU (one device→host→device round trip);
- newton: Newton–Schulz, 5 and 10 iterations on the GPU (IterNorm's scheme; no eigh, not exact).

Each W is checked in float64: err = max|W Σ Wᵀ − I|. Times are medians of --repeats calls, each
synchronized, interleaved across options. Σ is the covariance of 8c correlated samples plus
a 1e-5 ridge (a batch covariance after the norm's eps).

    python benchmarks/cuda_eigh.py --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from exoticnorm import whitening as W

SIZES = [(1, 6), (1, 16), (1, 32), (1, 64), (1, 84), (1, 120), (1, 128), (1, 256), (1, 512),
         (4, 16), (16, 16), (32, 16), (64, 16), (8, 64), (4, 128)]


def covariances(g: int, c: int, device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(c) + 0.5 * torch.randn(g, c, c, generator=gen)
    x = mix @ torch.randn(g, c, 8 * c, generator=gen)
    cov = x @ x.mT / x.shape[-1] + 1e-5 * torch.eye(c)
    return cov.to(device)


def _route(name: str):
    def whiten(cov):
        os.environ["EXOTICNORM_CUDA_EIGH"] = name
        return W.inv_sqrt_eigh(cov)
    return whiten


OPTIONS = {"device": _route("device"), "host": _route("host"),
           "newton5": lambda cov: W.inv_sqrt_newton(cov, 5), "newton10": lambda cov: W.inv_sqrt_newton(cov, 10)}


def error(w: torch.Tensor, cov: torch.Tensor) -> float:
    w, cov = w.double(), cov.double()
    eye = torch.eye(cov.shape[-1], dtype=torch.float64, device=cov.device)
    return (w @ cov @ w.mT - eye).abs().max().item()


def run(device: torch.device, repeats: int, sizes=SIZES) -> list[dict]:
    saved = os.environ.get("EXOTICNORM_CUDA_EIGH")
    options = OPTIONS if device.type == "cuda" else {k: v for k, v in OPTIONS.items() if k != "host"}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    try:
        for g, c in sizes:
            cov = covariances(g, c, device)
            times = {k: [] for k in options}
            errs = {k: error(f(cov), cov) for k, f in options.items()}  # also the warm-up
            for _ in range(repeats):
                for k, f in options.items():
                    sync()
                    t0 = time.perf_counter()
                    f(cov)
                    sync()
                    times[k].append(time.perf_counter() - t0)
            row = {"groups": g, "c": c}
            row.update({f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()})
            row.update({f"{k}_err": e for k, e in errs.items()})
            rows.append(row)
            print(f"G={g:3d} c={c:4d} | " + " ".join(f"{k} {row[k + '_ms']:7.3f} ms ({row[k + '_err']:.1e})"
                                                       for k in options), flush=True)
    finally:
        if saved is None:
            os.environ.pop("EXOTICNORM_CUDA_EIGH", None)
        else:
            os.environ["EXOTICNORM_CUDA_EIGH"] = saved
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    dev = torch.device(a.device)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}; "
          f"ms = median of {a.repeats}; (err) = max|W Σ Wᵀ − I| in float64; float32 input")
    rows = run(dev, a.repeats)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": str(dev), "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
