"""The foundation's accuracy targets on full FashionMNIST (about 1 minute each on 2 CPU cores).

Run deliberately: `.venv/bin/python -m pytest -m slow` (CI does, after the default suite).
"""

import pytest

from exoticnorm import data
from exoticnorm.train import RunConfig, train_run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(data.find_idx_dir(data.DEBIAN_DIR) is None, reason="FashionMNIST not installed"),
]


def test_d2l_bn_lenet_defaults_reach_085(tmp_path):
    summary = train_run(RunConfig(norm="bn"), tmp_path / "bn", device="cpu", wandb_mode="disabled")
    assert summary["test_acc"] >= 0.85, summary


def test_d2l_plain_lenet_reaches_078(tmp_path):
    config = RunConfig(norm="none", lr=0.9, batch_size=256)
    summary = train_run(config, tmp_path / "none", device="cpu", wandb_mode="disabled")
    assert summary["test_acc"] >= 0.78, summary


def test_zca_lenet_with_precise_statistics_reaches_085(tmp_path):
    # seed 0 measured 0.8856 (studies/whitening-lenet); without precise eval statistics the
    # same setup scored 0.38-0.81 across seeds
    summary = train_run(RunConfig(norm="zca"), tmp_path / "zca", device="cpu", wandb_mode="disabled")
    assert summary["test_acc"] >= 0.85, summary
