"""The PIT CPU step of this tree against the one of an earlier commit, and torch's BatchNorm.

Builds ``exoticnorm/csrc/pit_cpu.cpp`` as it was at ``--rev`` next to the current build (same
compiler flags), then times forward+backward of ``step`` (the kernel alone: no module, no
Python bookkeeping) for both and of torch.nn.BatchNorm1d on the same (N, C, S) tensor,
interleaved round by round; prints the medians and the ratios to BN. The fc shapes are given
as the kernel sees them (one row of N values per channel).

Where the allocator returns freed activations to the OS between steps (glibc's default trim
threshold), each step's fresh tensors are page-faulted in again and the ratios at the largest
shape swing from run to run; ``MALLOC_TRIM_THRESHOLD_=1000000000
MALLOC_MMAP_THRESHOLD_=1000000000`` (or jemalloc/tcmalloc) keeps the memory and leaves the
compute.

    .venv/bin/python benchmarks/pit_step_ab.py --rev 8e590ec
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from exoticnorm.kernels import _build_flags, pit_cpu
from exoticnorm.pit import PITNorm

SHAPES = [(256, 6, 576), (256, 16, 64), (1, 120, 256), (1, 84, 256)]  # LeNet's, batch 256


def build_at(rev: str):
    """The PIT kernel as it was at git revision ``rev`` (its csrc headers with it)."""
    root = Path(__file__).resolve().parents[1]

    def show(path: str) -> str:
        return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, check=True, capture_output=True,
                              text=True).stdout

    build = Path(tempfile.mkdtemp(prefix="pit_ab_"))
    (build / "pit_rev.cpp").write_text(show("exoticnorm/csrc/pit_cpu.cpp"))
    listed = subprocess.run(["git", "ls-tree", "--name-only", rev, "exoticnorm/csrc/"], cwd=root, check=True,
                            capture_output=True, text=True).stdout.split()
    for header in (h for h in listed if h.endswith(".h")):
        (build / Path(header).name).write_text(show(header))
    cflags, ldflags = _build_flags()
    name = "pit_ab_" + subprocess.run(["git", "rev-parse", "--short=10", rev], cwd=root, check=True,
                                      capture_output=True, text=True).stdout.strip()
    return load(name=name, sources=[str(build / "pit_rev.cpp")], extra_cflags=cflags, extra_ldflags=ldflags)


def step_fn(kernel, x, g, w, b, sketch):
    buffers = (sketch.center, sketch.scale, sketch.cdf, sketch.weight, sketch.mean, sketch.var, sketch.ready,
               sketch.nonfinite, sketch.atom, sketch.atom_mass)
    options = (500, True, 1e-3, 8.0, 0.1, sketch.regrid_shift, True, True)
    if "arg22" in (kernel.step.__doc__ or ""):  # since 2026-12-01: num_batches_tracked after the buffers, if_ready
        call = lambda: kernel.step(x, w, b, *buffers, None, *options, False)  # noqa: E731
    else:
        call = lambda: kernel.step(x, w, b, *buffers, *options)  # noqa: E731

    def run():
        y = call()
        (y[0] if isinstance(y, (list, tuple)) else y).backward(g)  # earlier steps returned (y, regrid, std)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rev", required=True, help="git revision whose pit_cpu.cpp to compare against")
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    old, new = build_at(args.rev), pit_cpu()
    if new is None:
        raise SystemExit("the current PIT kernel could not be built (see the warning above)")
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads; forward+backward medians (µs), ratio to BatchNorm1d")
    for shape in SHAPES:
        c = shape[1]
        x = torch.randn(shape, requires_grad=True)
        g = torch.randn(shape)
        sketch = PITNorm(c).sketch
        sketch.follow(x.detach(), dim=1)  # the grid from the batch, as a first step sets it
        w, b = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
        bn = torch.nn.BatchNorm1d(c)
        runs = {"bn": lambda: bn(x).backward(g), args.rev: step_fn(old, x, g, w, b, sketch),
                "this tree": step_fn(new, x, g, w, b, sketch)}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for run in runs.values():
            for _ in range(5):
                run()
        for _ in range(args.repeats):
            for k, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        cells = "  ".join(f"{k} {med[k]:.0f} ({med[k] / med['bn']:.2f}x)" for k in runs if k != "bn")
        print(f"{'x'.join(map(str, shape)):>12}: bn {med['bn']:.0f}  {cells}")


if __name__ == "__main__":
    main()
