import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

# the PIT kernel's build cache stays put while each test gets its own XDG_CACHE_HOME
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch, tmp_path):
    """No test talks to wandb's servers; tests that want offline runs ask for them."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("EXOTICNORM_DATA", raising=False)


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_fake_fashion(root: Path, n_train: int = 512, n_test: int = 128, gz: bool = True, seed: int = 0):
    """A learnable stand-in for FashionMNIST: class k brightens row block k of the image."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 80, (n, 28, 28))
        for i, k in enumerate(labels):
            images[i, 2 * k + 4 : 2 * k + 7, 4:24] += 150
        write_idx(root / f"{split}-images-idx3-ubyte", images, gz)
        write_idx(root / f"{split}-labels-idx1-ubyte", labels, gz)
    return root


@pytest.fixture
def fake_data(tmp_path) -> Path:
    return make_fake_fashion(tmp_path / "fashion")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def train_steps(model, x, y, opt, steps):
    """``steps`` optimizer steps of cross-entropy on one fixed batch; the losses."""
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
