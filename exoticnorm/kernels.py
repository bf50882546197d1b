"""Fused CPU kernels (C++, compiled on first use with torch's cpp_extension, cached after).

``pit_cpu()`` returns the compiled module, or None when no compiler is available (PITNorm
then runs its pure-torch path; a warning says so once). ``EXOTICNORM_NO_KERNELS=1`` turns
the kernels off. The build goes to torch's extension cache ($TORCH_EXTENSIONS_DIR, else
~/.cache/torch_extensions): the first use takes about a minute, later ones a second.

On x86 CPUs where torch's own kernels use AVX2 or AVX-512 the kernel is built with AVX2 and FMA
(its loops over values then run 8 floats at a time); elsewhere with the compiler's defaults.
``-fno-trapping-math`` (no floating-point traps; results unchanged) lets GCC turn the tables'
branch-free selects into vector code.
The instruction set is part of the build's name, so machines of different kinds that share a
home directory (a cluster) each get their own build, never one their CPU cannot run.
"""

from __future__ import annotations

import logging
import os
import platform
import warnings
from pathlib import Path

import torch

__all__ = ["pit_cpu"]

_CSRC = Path(__file__).parent / "csrc"
_cache: dict[str, object] = {}


def _instruction_set() -> tuple[str, list[str]]:
    """(name, compiler flags) of the instruction set to build for."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return "avx2", ["-mavx2", "-mfma"]
    return "generic", []


def pit_cpu():
    if os.environ.get("EXOTICNORM_NO_KERNELS") == "1":
        return None
    if "pit" not in _cache:
        try:
            # importing cpp_extension warns about CUDA_HOME on machines without a GPU: not our case
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            from torch.utils.cpp_extension import load

            isa, flags = _instruction_set()
            _cache["pit"] = load(
                name=f"exoticnorm_pit_cpu_{isa}", sources=[str(_CSRC / "pit_cpu.cpp")],
                extra_cflags=["-O3", "-fno-trapping-math", "-fopenmp", *flags], extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as exc:  # noqa: BLE001 - any build failure falls back to torch ops
            warnings.warn(f"exoticnorm: could not build the PIT CPU kernel ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); PITNorm uses its slower pure-torch path. Install a C++ "
                          "compiler (g++) and ninja to get the fused kernel.", RuntimeWarning, stacklevel=3)
            _cache["pit"] = None
    return _cache["pit"]
