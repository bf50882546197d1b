"""FashionMNIST discovery and IDX parsing (on small files the tests write)."""

import numpy as np
import pytest
import torch

from conftest import make_fake_fashion, write_idx
from exoticnorm import data


def test_read_idx_round_trip(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    write_idx(tmp_path / "x", a, gz=False)
    write_idx(tmp_path / "y", a, gz=True)
    assert np.array_equal(data.read_idx(tmp_path / "x"), a)
    assert np.array_equal(data.read_idx(tmp_path / "y.gz"), a)


def test_read_idx_rejects_garbage_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04hello")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "bad")
    a = np.zeros((4, 3), np.uint8)
    write_idx(tmp_path / "t", a, gz=False)
    (tmp_path / "t").write_bytes((tmp_path / "t").read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(tmp_path / "t")


def test_load_from_data_dir_plain_and_torchvision_layout(tmp_path):
    make_fake_fashion(tmp_path / "flat", 40, 20, gz=False)
    make_fake_fashion(tmp_path / "tv" / "FashionMNIST" / "raw", 40, 20)
    for root in (tmp_path / "flat", tmp_path / "tv"):
        ds = data.load_fashion_mnist(root, download=False, limit_train=30)
        assert ds.train_x.shape == (30, 1, 28, 28) and ds.test_x.shape == (20, 1, 28, 28)
        assert ds.train_x.dtype == torch.float32 and 0 <= ds.train_x.min() and ds.train_x.max() <= 1
        assert ds.train_y.dtype == torch.int64 and ds.train_y.max() < 10


def test_search_order_env_then_cache(tmp_path, monkeypatch):
    env_dir = make_fake_fashion(tmp_path / "env", 10, 10)
    cache = make_fake_fashion(tmp_path / "cache" / "exoticnorm", 12, 10)
    monkeypatch.setenv("EXOTICNORM_DATA", str(env_dir))
    assert data.load_fashion_mnist(download=False).source == str(env_dir)
    explicit = make_fake_fashion(tmp_path / "explicit", 14, 10)
    assert data.load_fashion_mnist(explicit, download=False).source == str(explicit)
    monkeypatch.delenv("EXOTICNORM_DATA")
    assert data.load_fashion_mnist(download=False).source == str(cache)


def test_missing_dataset_error_names_every_way(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "nodebian")

    def offline(root):
        raise OSError("no network")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(data.DatasetNotFound) as info:
        data.load_fashion_mnist(tmp_path / "empty")
    message = str(info.value)
    for part in ("--data-dir", "EXOTICNORM_DATA", "user cache", "dataset-fashion-mnist",
                 "torchvision download", "no network"):
        assert part in message
