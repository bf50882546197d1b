"""Does a warm start replace eigh in the fc layers (issue #11)? Measured, not assumed.

Each training step whitens a new batch's covariance. Starting from the previous step's
eigenvectors U₀, the refinement of Ogita & Aishima (2018; X ← X + X E from R = I − XᵀX and
S = XᵀΣX, four c×c×c products per iteration) converges quadratically once off(U₀ᵀ Σ U₀) is small
against the eigenvalue gaps. This script measures how small it is between consecutive batches,
and how many iterations reach the accuracy of eigh (relative off-diagonal ≤ 1e-6), for:

- ``batch``: two independent batches of N samples (what consecutive training steps see: the
  sampling noise of a c×c covariance from N ≈ 2c samples);
- ``drift ε``: Σ₁ = Σ₀ + ε (Σ' − Σ₀), a covariance that changes slowly (the running covariance's
  regime, not the batch's).

Data: ReLU of correlated Gaussians (c channels, mixing I + G/√c), Ledoit–Wolf-style shrinkage
0.2 as the layers use when N < 4c; float64 throughout (so float rounding is not what stops it).

    .venv/bin/python benchmarks/warm_start_eigh.py
"""

from __future__ import annotations

import torch

TARGET = 1e-6
MAX_ITERATIONS = 8


def batch_covariance(mix: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    c = mix.shape[0]
    x = torch.relu(torch.randn(n, c, generator=gen, dtype=torch.float64) @ mix)
    xc = x - x.mean(0)
    cov = xc.T @ xc / n
    return 0.8 * cov + (0.2 * cov.diagonal().mean() + 1e-5) * torch.eye(c, dtype=torch.float64)


def refine(a: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One Ogita–Aishima step; returns the new X and the relative off-diagonal of XᵀAX before it.
    Pairs closer than δ (the method's cluster bound) are only re-orthogonalized."""
    c = a.shape[0]
    eye = torch.eye(c, dtype=a.dtype)
    r = eye - x.T @ x
    s = x.T @ (a @ x)
    lam = s.diagonal() / (1 - r.diagonal())
    off = s - torch.diag(lam)
    delta = 2 * (torch.linalg.matrix_norm(off, 2) + torch.linalg.matrix_norm(a, 2) * torch.linalg.matrix_norm(r, 2))
    gap = lam[None, :] - lam[:, None]
    apart = gap.abs() > delta
    e = torch.where(apart, (s + lam[None, :] * r) / torch.where(apart, gap, torch.ones_like(gap)), r / 2)
    e.diagonal().copy_(r.diagonal() / 2)
    return x + x @ e, (off.abs().max() / lam.abs().max()).item()


def iterations_needed(a: torch.Tensor, u0: torch.Tensor) -> tuple[float, int | None]:
    x, first = u0.clone(), None
    for it in range(MAX_ITERATIONS + 1):
        x_next, off = refine(a, x)
        first = off if first is None else first
        if off <= TARGET:
            return first, it
        x = x_next
    return first, None


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    print(f"relative off-diagonal of U0^T S U0, and Ogita-Aishima iterations to <= {TARGET:g} (None: not in {MAX_ITERATIONS})")
    print(f"{'c':>4}{'N':>6}  {'case':<12}{'off(start)':>12}{'iterations':>12}")
    for c, n in ((120, 128), (120, 256), (84, 128), (84, 256)):
        mix = torch.eye(c, dtype=torch.float64) + torch.randn(c, c, generator=gen, dtype=torch.float64) / c**0.5
        cov0 = batch_covariance(mix, n, gen)
        _, u0 = torch.linalg.eigh(cov0)
        cases = [("batch", batch_covariance(mix, n, gen))]
        for eps in (1e-2, 1e-3):
            cases.append((f"drift {eps:g}", cov0 + eps * (batch_covariance(mix, n, gen) - cov0)))
        for name, cov in cases:
            off, its = iterations_needed(cov, u0)
            print(f"{c:>4}{n:>6}  {name:<12}{off:>12.1e}{str(its):>12}")


if __name__ == "__main__":
    main()
