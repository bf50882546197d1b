"""Fused CPU kernels (C++, compiled on first use with torch's cpp_extension, cached after).

``pit_cpu()`` returns the compiled module, or None when no compiler is available (PITNorm
then runs its pure-torch path; a warning says so once). ``EXOTICNORM_NO_KERNELS=1`` turns
the kernels off. The build goes to torch's extension cache ($TORCH_EXTENSIONS_DIR, else
~/.cache/torch_extensions): the first use takes about a minute, later ones a second.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

__all__ = ["pit_cpu"]

_CSRC = Path(__file__).parent / "csrc"
_cache: dict[str, object] = {}


def pit_cpu():
    if os.environ.get("EXOTICNORM_NO_KERNELS") == "1":
        return None
    if "pit" not in _cache:
        try:
            # importing cpp_extension warns about CUDA_HOME on machines without a GPU: not our case
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            from torch.utils.cpp_extension import load

            _cache["pit"] = load(
                name="exoticnorm_pit_cpu", sources=[str(_CSRC / "pit_cpu.cpp")],
                extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as exc:  # noqa: BLE001 - any build failure falls back to torch ops
            warnings.warn(f"exoticnorm: could not build the PIT CPU kernel ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); PITNorm uses its slower pure-torch path. Install a C++ "
                          "compiler (g++) and ninja to get the fused kernel.", RuntimeWarning, stacklevel=3)
            _cache["pit"] = None
    return _cache["pit"]
