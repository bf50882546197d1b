"""`exoticnorm study` end to end: files, wandb offline, resume, and every bad input."""

import json
import os

import pytest
import torch
from click.testing import CliRunner

from exoticnorm import data
from exoticnorm.cli import main
from exoticnorm.train import RunConfig, train_run

TIMING = {"images_per_sec", "epoch_time", "elapsed"}


def study(*args):
    return CliRunner().invoke(main, ["study", *args], catch_exceptions=False)


@pytest.mark.skipif(data.find_idx_dir(data.DEBIAN_DIR) is None,
                    reason="real FashionMNIST not installed (scripts/setup.sh installs it)")
def test_real_study_on_a_slice_with_offline_wandb(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    out = tmp_path / "run"
    result = study("--norm", "bn", "--epochs", "2", "--limit-train", "4000", "--limit-test", "1000",
                   "--out", str(out), "--wandb", "offline")
    assert result.exit_code == 0, result.output
    assert "wandb sync" in result.output and "fashion-mnist" in result.output
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "images_per_sec", "epoch_time",
                "act/conv1/mean", "act/fc2/std"):
        assert key in lines[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["config"]["norm"] == "bn"
    assert summary["test_acc"] > 0.5  # chance is 0.1
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and "net.norm_conv1.running_mean" in ckpt["model"]
    assert list((out / "wandb").glob("offline-run-*/*.wandb"))


def _strip(lines):
    return [{k: v for k, v in json.loads(l).items() if k not in TIMING} for l in lines]


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, fake_data):
    config = RunConfig(norm="bn", epochs=3, lr=0.05, batch_size=64, optimizer="momentum",
                         dropout=0.3, seed=3)
    kw = dict(data_dir=fake_data, device="cpu", download=False, echo=lambda s: None)
    full = train_run(config, tmp_path / "full", **kw)
    part = tmp_path / "part"
    assert train_run(config, part, stop_after=1, **kw)["status"] == "stopped"
    with (part / "metrics.jsonl").open("a") as f:  # epoch 2 written, then killed mid-line
        f.write(json.dumps({"epoch": 2, "train_loss": 9.0}) + "\n" + '{"epoch": 3, "tra')
    result = study("--resume", "--out", str(part), "--data-dir", str(fake_data), "--no-download")
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output
    resumed = json.loads((part / "summary.json").read_text())
    for key in ("test_acc", "train_acc", "train_loss", "test_loss"):
        assert resumed[key] == full[key], key
    a = _strip((tmp_path / "full" / "metrics.jsonl").read_text().splitlines())
    b = _strip((part / "metrics.jsonl").read_text().splitlines())
    assert a == b
    s1 = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    s2 = torch.load(part / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_existing_and_unwritable_run_directories(tmp_path, fake_data):
    out = tmp_path / "run"
    args = ["--epochs", "1", "--data-dir", str(fake_data), "--no-download", "--out", str(out)]
    assert study(*args).exit_code == 0
    before = (out / "summary.json").read_text()
    again = study(*args)
    assert again.exit_code == 1 and "holds a finished run" in again.output
    assert (out / "summary.json").read_text() == before
    resumed = study("--resume", *args)
    assert resumed.exit_code == 1 and "nothing to resume" in resumed.output
    (out / "summary.json").unlink()
    unfinished = study(*args)
    assert unfinished.exit_code == 1 and "--resume" in unfinished.output
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        result = study("--epochs", "1", "--data-dir", str(fake_data), "--out", str(locked / "x"))
        assert result.exit_code == 1 and "cannot write" in result.output
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = study("--epochs", "1", "--data-dir", str(fake_data), "--no-download", "--out", str(blocker / "x"))
    assert result.exit_code == 1 and "cannot write to --out" in result.output


def test_resume_rejects_corrupt_and_mismatched_checkpoints(tmp_path, fake_data):
    out = tmp_path / "run"
    kw = dict(data_dir=fake_data, device="cpu", download=False, echo=lambda s: None)
    train_run(RunConfig(epochs=2), out, stop_after=1, **kw)
    base = ["--resume", "--out", str(out), "--data-dir", str(fake_data), "--no-download"]
    mismatch = study(*base, "--lr", "0.5")
    assert mismatch.exit_code == 1 and "lr: checkpoint 0.1 vs now 0.5" in mismatch.output
    good = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(good[: len(good) // 2])
    corrupt = study(*base)
    assert corrupt.exit_code == 1 and "unreadable" in corrupt.output
    assert len((out / "checkpoint.pt").read_bytes()) == len(good) // 2  # left untouched
    torch.save({"format": "exoticnorm-checkpoint", "version": 1, "epoch": 1,
                "config": json.loads((out / "config.json").read_text()),
                "model": {"bogus": torch.zeros(1)}, "optimizer": {}, "rng_cpu": torch.get_rng_state(),
                "elapsed": 0.0}, out / "checkpoint.pt")
    wrong = study(*base)
    assert wrong.exit_code == 1 and "does not fit this model" in wrong.output
    missing = study("--resume", "--out", str(tmp_path / "nothing"))
    assert missing.exit_code == 1 and "config.json not found" in missing.output


def test_resume_a_run_started_before_later_fields_and_the_rename(tmp_path, fake_data):
    """config.json and the checkpoint store the config as a plain dict (no class name): a run
    started before model/activation/precise_stats existed (and before RunConfig had its name) resumes."""
    out = tmp_path / "run"
    kw = dict(data_dir=fake_data, device="cpu", download=False, echo=lambda s: None)
    train_run(RunConfig(epochs=2), out, stop_after=1, **kw)
    newer = ("model", "activation", "precise_stats")
    old = {k: v for k, v in json.loads((out / "config.json").read_text()).items() if k not in newer}
    (out / "config.json").write_text(json.dumps(old))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["config"] = dict(old)
    torch.save(ckpt, out / "checkpoint.pt")
    result = study("--resume", "--out", str(out), "--data-dir", str(fake_data), "--no-download")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_done"] == 2
    assert summary["config"] == {**old, "model": "lenet", "activation": "sigmoid", "precise_stats": 100}


def test_nonfinite_input_ends_run_as_diverged_and_keeps_last_checkpoint(tmp_path, fake_data):
    out = tmp_path / "run"
    kw = dict(device="cpu", download=False, echo=lambda s: None)
    config = RunConfig(epochs=3)
    train_run(config, out, data_dir=fake_data, stop_after=1, **kw)
    good = torch.load(out / "checkpoint.pt", weights_only=True)
    poisoned = data.load_fashion_mnist(fake_data, download=False)
    poisoned.train_x[5, 0, 3, 3] = float("nan")
    messages = []
    summary = train_run(config, out, resume=True, data=poisoned, **{**kw, "echo": messages.append})
    assert summary["status"] == "diverged"
    assert any("diverged in epoch 2" in m and "smaller --lr and another --out" in m for m in messages)
    kept = torch.load(out / "checkpoint.pt", weights_only=True)
    assert kept["epoch"] == 1
    assert all(torch.equal(kept["model"][k], good["model"][k]) for k in good["model"])
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"


def test_diverged_run_exits_with_code_3(tmp_path, monkeypatch):
    monkeypatch.setattr("exoticnorm.cli.train_run", lambda *a, **k: {"status": "diverged"})
    assert study("--out", str(tmp_path / "r")).exit_code == 3


def test_wandb_failure_does_not_stop_training(tmp_path, fake_data, monkeypatch):
    import wandb

    def broken(*a, **k):
        raise RuntimeError("network is unreachable")

    monkeypatch.setattr(wandb, "init", broken)
    out = tmp_path / "run"
    result = study("--epochs", "1", "--data-dir", str(fake_data), "--no-download", "--out", str(out),
                   "--wandb", "online")
    assert result.exit_code == 0, result.output
    assert "wandb init failed" in result.output and "network is unreachable" in result.output
    assert (out / "summary.json").exists() and (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("args,message", [
    (["--norm", "batchnorm"], "unknown norm 'batchnorm'"),
    (["--norm", "gn", "--norm-opt", "groups=2"], "Did you mean 'num_groups'"),
    (["--norm", "gn", "--norm-opt", "num_groups=two"], "takes an integer"),
    (["--norm", "bn", "--norm-opt", "affine=maybe"], "takes true or false"),
    (["--norm-opt", "novalue"], "expects key=value"),
    (["--optimizer", "lbfgs"], "Invalid value for '--optimizer'"),
    (["--device", "tpu"], "unknown --device 'tpu'"),
])
def test_bad_cli_input(tmp_path, fake_data, args, message):
    result = study(*args, "--epochs", "1", "--data-dir", str(fake_data), "--no-download",
                   "--out", str(tmp_path / "r"))
    assert result.exit_code != 0
    assert message in result.output
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_missing_dataset_is_a_clear_cli_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "none")
    result = study("--epochs", "1", "--data-dir", str(tmp_path / "empty"), "--no-download",
                   "--out", str(tmp_path / "r"))
    assert result.exit_code == 1 and "FashionMNIST was not found" in result.output


def test_norm_opts_are_typed_and_used(tmp_path, fake_data):
    out = tmp_path / "r"
    result = study("--norm", "gn", "--norm-opt", "num_groups=2", "--norm-opt", "eps=1",
                   "--epochs", "1", "--data-dir", str(fake_data), "--no-download", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["norm_opts"] == {"num_groups": 2, "eps": 1.0}


def test_norms_command_lists_every_norm():
    result = CliRunner().invoke(main, ["norms"])
    assert result.exit_code == 0
    for name in ("bn", "bn-mean", "bn-var", "bn-frozen", "ln", "in", "gn", "running-bn", "none"):
        assert any(line.split()[0] == name for line in result.output.splitlines() if line.strip())
