"""Fused CPU kernels (C++, compiled on first use with torch's cpp_extension, cached after).

``pit_cpu()`` (PITNorm's training transform) and ``whiten_cpu()`` (batch whitening's
big-tensor passes) return the compiled module, or None when no compiler is available (the
norm then runs its pure-torch path; a warning says so once). ``EXOTICNORM_NO_KERNELS=1`` turns
the kernels off. The build goes to torch's extension cache ($TORCH_EXTENSIONS_DIR, else
~/.cache/torch_extensions): the first use takes about a minute, later ones a second.

On x86 CPUs where torch's own kernels use AVX2 or AVX-512 the kernel is built with AVX2 and FMA
(its loops over values then run 8 floats at a time); elsewhere with the compiler's defaults.
``-fno-trapping-math`` (no floating-point traps; results unchanged) lets GCC turn the tables'
branch-free selects into vector code.
The instruction set is part of the build's name, so machines of different kinds that share a
home directory (a cluster) each get their own build, never one their CPU cannot run. So is a
short hash of the C++ source (and the shared headers), the compiler flags, torch's version and
the Python ABI (``extension_name("pit_cpu")``, e.g. ``exoticnorm_pit_cpu_avx2_1a2b3c4d5e``): two installs with the same
source and torch share one build, and installs that differ never rebuild over each other's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

__all__ = ["pit_cpu", "whiten_cpu", "extension_name"]

_CSRC = Path(__file__).parent / "csrc"
_cache: dict[str, object] = {}


def _instruction_set() -> tuple[str, list[str]]:
    """(name, compiler flags) of the instruction set to build for."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return "avx2", ["-mavx2", "-mfma"]
    return "generic", []


def _build_flags() -> tuple[list[str], list[str]]:
    """(compiler flags, linker flags) of the build."""
    _, isa_flags = _instruction_set()
    return ["-O3", "-fno-trapping-math", "-fopenmp", *isa_flags], ["-fopenmp"]


def extension_name(source: str = "pit_cpu") -> str:
    """The build's name in torch's extension cache: ``exoticnorm_<source>_<isa>_<hash>``, the
    hash (10 hex digits) over the C++ source text and csrc's headers, the flags, torch's version
    and the Python ABI."""
    isa, _ = _instruction_set()
    cflags, ldflags = _build_flags()
    digest = hashlib.sha256()
    headers = [h.read_bytes() for h in sorted(_CSRC.glob("*.h"))]  # included by the sources
    for part in ((_CSRC / f"{source}.cpp").read_bytes(), *headers, b"|", " ".join(cflags).encode(), b"|",
                 " ".join(ldflags).encode(), b"|", torch.__version__.encode(), b"|",
                 sys.implementation.cache_tag.encode()):
        digest.update(part)
    return f"exoticnorm_{source}_{isa}_{digest.hexdigest()[:10]}"


def _load(source: str, what: str):
    """The compiled ``csrc/<source>.cpp``, or None (with one warning) when it cannot be built."""
    if os.environ.get("EXOTICNORM_NO_KERNELS") == "1":
        return None
    if source not in _cache:
        try:
            # importing cpp_extension warns about CUDA_HOME on machines without a GPU: not our case
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            from torch.utils.cpp_extension import load

            cflags, ldflags = _build_flags()
            _cache[source] = load(
                name=extension_name(source), sources=[str(_CSRC / f"{source}.cpp")],
                extra_cflags=cflags, extra_ldflags=ldflags, verbose=False)
        except Exception as exc:  # noqa: BLE001 - any build failure falls back to torch ops
            warnings.warn(f"exoticnorm: could not build the {what} CPU kernel ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); the norm uses its slower pure-torch path. Install a C++ "
                          "compiler (g++) and ninja to get the fused kernel.", RuntimeWarning, stacklevel=3)
            _cache[source] = None
    return _cache[source]


def pit_cpu():
    """PITNorm's fused training transform (``csrc/pit_cpu.cpp``), or None."""
    return _load("pit_cpu", "PIT")


def whiten_cpu():
    """Batch whitening's big-tensor passes (``csrc/whiten_cpu.cpp``), or None."""
    return _load("whiten_cpu", "whitening")
