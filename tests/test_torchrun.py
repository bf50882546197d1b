"""One run over 2 processes (`exoticnorm study --nproc 2`: torchrun, gloo, DistributedDataParallel)
against one process with the same global batch, and the bad inputs of a multi-process run.

The runs: a tiny LeNet (251 fake images, batch 32: 7 full batches and one of 27, split 14/13,
so the shards are unequal in the last step; 128 test images; 2 epochs). Per epoch the train and
test losses agree to a relative RTOL = 2e-5, the accuracies to one image. Why not
bit-identical: the two runs add the same float32 numbers in another order. Each rank sums its
shard's statistics and all_reduce adds the partial sums, DDP averages two half-batch gradients,
the epoch loss is summed per rank and then over ranks; each such sum differs by a few ulps
(float32: ~6e-8 relative) and 16 SGD steps carry that on. Measured here: at most 6.4e-7
relative on the losses and equal accuracies. Statistics that are not synced (bn per rank, 16
images instead of 32) move the losses by 4e-4 to 6e-2 relative, 20x the tolerance and more.

zca runs with a fixed shrinkage: under the default "auto" a group of c channels seeing fewer than
4c samples (fc1: 120 channels, 32 images) uses Ledoit-Wolf's ρ, which the ranks only approximate
(the mean of their estimates, see ZCANorm._synced_batch), so 2 processes would not equal one
(measured: train loss off by 0.3 after 3 epochs). And with d2l's sigmoid: under relu, zca's
eigh path is chaotic in one process already (inputs scaled by 1 + 1e-6 move the first epoch's
loss by 1e-3), so no run could match another to roundoff. The zca case costs a torchrun start
(~20 s here) and is ``slow``; the default suite covers zca's sync in test_ddp_models.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from click.testing import CliRunner

from exoticnorm import distributed
from exoticnorm.cli import main
from exoticnorm.train import RunConfig, train_run

BN = dict(norm="bn", activation="relu", lr=0.05)  # relu: a test accuracy well above chance
ZCA = dict(norm="zca", norm_opts={"shrinkage": 0.1})  # sigmoid, lr 0.1 (see above)
SIZES = dict(batch_size=32, limit_train=251, limit_test=128)
RTOL = 2e-5


def _study(out: Path, fake_data: Path, *args: str) -> str:
    """`exoticnorm study --nproc 2 ...` in a subprocess (torchrun needs a real process); stdout."""
    argv = [sys.executable, "-m", "exoticnorm", "study", "--nproc", "2", "--out", str(out),
            "--data-dir", str(fake_data), "--no-download", "--device", "cpu", "--wandb", "disabled", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _args(epochs: int, settings: dict) -> list[str]:
    """``settings`` (RunConfig fields) and SIZES as `study` options."""
    args = ["--epochs", str(epochs)]
    for key, value in {**SIZES, **settings}.items():
        if key == "norm_opts":
            args += [a for k, v in value.items() for a in ("--norm-opt", f"{k}={v}")]
        else:
            args += ["--" + key.replace("_", "-"), str(value)]
    return args


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(one: Path, two: Path) -> None:
    a, b = _metrics(one), _metrics(two)
    assert [r["epoch"] for r in b] == [r["epoch"] for r in a] == [1, 2]  # rank 0 alone writes
    diffs = {k: max(abs(x[k] - y[k]) for x, y in zip(a, b))
             for k in ("train_loss", "test_loss", "train_acc", "test_acc", "test_loss_running", "test_acc_running")}
    print(f"2 processes vs 1, max abs diff per epoch: {diffs}")
    for x, y in zip(a, b):
        for key in ("train_loss", "test_loss", "test_loss_running"):
            assert y[key] == pytest.approx(x[key], rel=RTOL, abs=0), (key, x["epoch"], diffs)
        assert abs(y["train_acc"] - x["train_acc"]) <= 1.5 / 251, (x["epoch"], diffs)
        for key in ("test_acc", "test_acc_running"):
            assert abs(y[key] - x[key]) <= 1.5 / 128, (key, x["epoch"], diffs)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["processes"] == 2


def _one_process(tmp_path: Path, fake_data: Path, settings: dict) -> Path:
    """The reference run, on one thread as each torchrun process is (OMP_NUM_THREADS=1): with 2
    threads torch's conv kernels add in another order, and over 16 steps of this relu net that
    alone moved the train loss by 6e-4 (measured), 30x the tolerance."""
    out = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_run(RunConfig(epochs=2, **SIZES, **settings), out, data_dir=fake_data, device="cpu",
                  download=False, echo=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    return out


def test_bn_on_two_processes_resumed_equals_one_process(tmp_path, fake_data):
    """bn synced as SyncBatchNorm; the 2-process run is killed after epoch 1 and resumed."""
    one = _one_process(tmp_path, fake_data, BN)
    two = tmp_path / "two"
    first = _study(two, fake_data, *_args(1, BN))
    assert "2 processes on cpu" in first and first.count("finished:") == 1  # rank 0 alone echoes
    (two / "summary.json").unlink()  # as if killed after epoch 1's checkpoint
    resumed = _study(two, fake_data, "--resume", "--epochs", "2")
    assert resumed.count("resuming") == 1
    _assert_same_run(one, two)


@pytest.mark.slow
def test_zca_on_two_processes_equals_one_process(tmp_path, fake_data):
    one = _one_process(tmp_path, fake_data, ZCA)
    two = tmp_path / "two"
    _study(two, fake_data, *_args(2, ZCA))
    _assert_same_run(one, two)


def _bad_rank(rank, world, init_file, out_dir, fake_data):
    """Three runs that must fail on every rank with the same clear error, none hanging."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))  # a rank left waiting fails, not hangs
    kw = dict(data_dir=fake_data, device="cpu", download=False, echo=lambda s: None)
    small = dict(epochs=1, limit_test=16, precise_stats=0)
    cases = {
        "batch": (RunConfig(batch_size=33, limit_train=66, **small), "batch"),
        "mismatch": (RunConfig(batch_size=32, limit_train=64, lr=0.1 * (rank + 1), **small), "mismatch"),
        "last": (RunConfig(batch_size=32, limit_train=66, **small), "last"),
    }
    errors = {}
    for case, (config, folder) in cases.items():
        try:
            train_run(config, Path(out_dir) / folder, **kw)
            errors[case] = None
        except distributed.DistributedError as exc:
            errors[case] = str(exc)
    Path(out_dir, f"errors{rank}.json").write_text(json.dumps(errors))
    dist.destroy_process_group()


def test_bad_multi_process_runs_fail_on_every_rank(tmp_path, fake_data):
    mp.start_processes(_bad_rank, args=(2, str(tmp_path / "init"), str(tmp_path), str(fake_data)),
                       nprocs=2, join=True, start_method="spawn")
    ranks = [json.loads((tmp_path / f"errors{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    errors = ranks[0]
    assert "--batch-size 33 does not split over 2 processes" in errors["batch"]
    assert "e.g. 32 or 34" in errors["batch"] and "divides it (3, 11)" in errors["batch"]
    assert "different settings (lr: rank 0 0.1, rank 1 0.2)" in errors["mismatch"]
    assert "holds 2 of the 66 training images" in errors["last"] and "--limit-train 64" in errors["last"]
    assert not (tmp_path / "batch").exists() and not (tmp_path / "mismatch").exists()  # nothing written


def test_nproc_refuses_bad_input_before_launching(fake_data, monkeypatch):
    base = ["study", "--data-dir", str(fake_data), "--no-download", "--device", "cpu"]
    result = CliRunner().invoke(main, [*base, "--nproc", "4", "--batch-size", "6"])
    assert result.exit_code == 2, result.output
    assert "--batch-size 6 does not split over 4 processes" in result.output
    assert "e.g. 8 or 12" in result.output and "divides it (2, 3)" in result.output
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(main, [*base, "--nproc", "2"])
    assert result.exit_code == 2 and "under torchrun leave it out" in result.output


def test_each_process_gets_its_own_gpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(distributed.DistributedError, match="names one GPU for 2 processes"):
        distributed.rank_device(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(distributed.DistributedError, match="2 processes on this node but 1 GPU"):
        distributed.rank_device(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.rank_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert distributed.rank_device(torch.device("cpu")) == torch.device("cpu")
