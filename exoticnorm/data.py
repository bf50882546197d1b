"""FashionMNIST as tensors resident on the training device (no per-image PIL in the loop).

Looked for, in order: ``data_dir`` (``--data-dir``) or ``$EXOTICNORM_DATA``; the user cache
(``$XDG_CACHE_HOME/exoticnorm``, default ``~/.cache/exoticnorm``); the IDX files of the Debian
package ``dataset-fashion-mnist``; torchvision's download into the user cache. A folder may
hold the four IDX files (plain or ``.gz``) directly or in torchvision's ``FashionMNIST/raw``.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["DatasetNotFound", "FashionMNIST", "load_fashion_mnist", "read_idx", "find_idx_dir"]

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class DatasetNotFound(FileNotFoundError):
    """No copy of the dataset was found or could be downloaded; the message lists every way."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "exoticnorm"


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian header, then unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {body.size} bytes")
    return body.reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_idx_dir(root: Path) -> Path | None:
    """The folder under ``root`` (itself, FashionMNIST/raw, or raw) holding all four IDX files."""
    for folder in (root, root / "FashionMNIST" / "raw", root / "raw"):
        if all(_idx_file(folder, stem) for stem in FILES.values()):
            return folder
    return None


@dataclass
class FashionMNIST:
    """Images as float32 in [0, 1], shape (N, 1, 28, 28); labels as int64; on one device."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    source: str


def _download(root: Path) -> None:
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    for train in (True, False):
        TorchvisionFashionMNIST(str(root), train=train, download=True)


def _locate(data_dir: str | os.PathLike | None, download: bool) -> Path:
    tried: list[str] = []
    explicit = data_dir or os.environ.get("EXOTICNORM_DATA")
    candidates = []
    if explicit:
        candidates.append(("--data-dir / $EXOTICNORM_DATA", Path(explicit).expanduser()))
    candidates.append(("user cache", cache_dir()))
    candidates.append(("Debian package dataset-fashion-mnist", DEBIAN_DIR))
    for label, root in candidates:
        found = find_idx_dir(root)
        if found:
            return found
        tried.append(f"  - {label}: nothing at {root}")
    if download:
        try:
            _download(cache_dir())
            found = find_idx_dir(cache_dir())
            if found:
                return found
            tried.append(f"  - torchvision download into {cache_dir()}: finished but no files")
        except Exception as exc:  # noqa: BLE001 - any failure becomes part of one clear message
            tried.append(f"  - torchvision download into {cache_dir()}: failed ({exc})")
    else:
        tried.append("  - torchvision download: not tried (download disabled)")
    raise DatasetNotFound(
        "FashionMNIST was not found. Looked in:\n" + "\n".join(tried) + "\n"
        "Get it one of these ways:\n"
        "  - pass --data-dir DIR (or set EXOTICNORM_DATA) to a folder holding the four IDX files "
        "(train-images-idx3-ubyte[.gz], ...) or torchvision's FashionMNIST/raw layout;\n"
        "  - on Debian/Ubuntu: apt-get install dataset-fashion-mnist;\n"
        f"  - when online: let torchvision download it into {cache_dir()} (the default)."
    )


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    download: bool = True,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> FashionMNIST:
    """Load FashionMNIST once onto ``device``; ``limit_*`` keep the first examples of each split."""
    folder = _locate(data_dir, download)
    arrays = {key: read_idx(_idx_file(folder, stem)) for key, stem in FILES.items()}

    def images(a: np.ndarray, limit: int | None) -> Tensor:
        t = torch.from_numpy(a[:limit].copy()).to(device)
        return t.unsqueeze(1).float().div_(255.0)

    def labels(a: np.ndarray, limit: int | None) -> Tensor:
        return torch.from_numpy(a[:limit].astype(np.int64)).to(device)

    return FashionMNIST(
        images(arrays["train_images"], limit_train),
        labels(arrays["train_labels"], limit_train),
        images(arrays["test_images"], limit_test),
        labels(arrays["test_labels"], limit_test),
        str(folder),
    )
