"""Issue #10 (items 6, 7): run-directory locks, workers that die with `exoticnorm run`, up-front
validation of norm options and study files, the wandb mode on resume, one wandb timeout per
`run`, and the kernel's build name."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from exoticnorm import kernels, tracking
from exoticnorm.cli import main
from exoticnorm.study import StudyError, load_study
from exoticnorm.runner import run_cells
from exoticnorm.train import RunConfig, train_run

SMALL = ["--epochs", "1", "--limit-train", "64", "--limit-test", "32", "--batch-size", "32",
         "--precise-stats", "0", "--device", "cpu", "--no-download"]


def invoke(*args):
    """The CLI in this process; exceptions are caught (a traceback would be a bug)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_exit(result, code, message):
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert message in result.output, result.output
    assert "Traceback" not in result.output


# ------------------------------------------------------------------ 1. run-directory lock

HOLDER = """
import fcntl, os, sys
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.truncate(0); f.write(f"{os.getpid()}\\n"); f.flush()
print("locked", flush=True)
sys.stdin.read()
"""


def test_study_into_a_run_directory_in_use_fails_at_once(tmp_path, fake_data):
    out = tmp_path / "run"
    train_run(RunConfig(epochs=2, limit_train=64, limit_test=32, batch_size=32, precise_stats=0), out,
              data_dir=fake_data, device="cpu", download=False, echo=lambda s: None, stop_after=1)
    before = (out / "metrics.jsonl").read_bytes()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    holders = [subprocess.Popen([sys.executable, "-c", HOLDER, str(d / ".lock")], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True) for d in (out, fresh)]
    try:
        for h in holders:
            assert h.stdout.readline().strip() == "locked"
        resumed = invoke("study", "--resume", "--out", out, "--epochs", "2", "--data-dir", fake_data,
                         "--no-download", "--device", "cpu")
        assert_clean_exit(resumed, 1, f"run directory {out} is in use by another process "
                                      f"(pid {holders[0].pid}); wait for it or choose another --out")
        assert (out / "metrics.jsonl").read_bytes() == before
        new = invoke("study", *SMALL, "--data-dir", fake_data, "--out", fresh)
        assert_clean_exit(new, 1, f"(pid {holders[1].pid})")
        assert sorted(p.name for p in fresh.iterdir()) == [".lock"]
    finally:
        for h in holders:
            h.stdin.close()
            h.wait(10)
    # the holders are gone: the same commands now run, and release the lock when they end
    assert invoke("study", "--resume", "--out", out, "--epochs", "2", "--data-dir", fake_data,
                  "--no-download", "--device", "cpu").exit_code == 0
    assert [json.loads(l)["epoch"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    with open(out / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the CLI still held it


def test_runner_reports_a_cell_locked_by_another_process_as_busy(tmp_path, fake_data):
    study = load_study(_write(tmp_path / "one.toml", ONE_CELL))
    out = tmp_path / "runs"
    cell_dir = out / study.cells[0].run_name
    cell_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(cell_dir / ".lock")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        log = []
        counts = run_cells(study, out, data_dir=str(fake_data), download=False, device="cpu", echo=log.append)
        assert counts["busy"] == 1 and any(f"pid {holder.pid}" in line for line in log), log
    finally:
        holder.stdin.close()
        holder.wait(10)
    counts = run_cells(study, out, data_dir=str(fake_data), download=False, device="cpu", echo=lambda s: None)
    assert counts["finished"] == 1


# ------------------------------------------------------------------ 2. workers die with `run`

ONE_CELL = """
question = "one cell"
[base]
epochs = 1
batch_size = 32
limit_train = 64
limit_test = 32
precise_stats = 0
"""

LONG = """
question = "two cells that take a while"
[base]
epochs = 10
batch_size = 16
limit_train = 128
limit_test = 32
precise_stats = 0
activation = "relu"
[grid]
norm = ["bn", "none"]
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_run_and_a_rerun_finishes(tmp_path, fake_data):
    study_file = _write(tmp_path / "long.toml", LONG)
    out = tmp_path / "runs"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    parent = subprocess.Popen([sys.executable, "-m", "exoticnorm", "run", str(study_file), "--jobs", "2",
                               "--out", str(out), "--device", "cpu", "--data-dir", str(fake_data),
                               "--no-download", "--wandb", "disabled"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not any("parameters" in p.read_text() for p in out.glob("*/log.txt")):  # a cell trains
            assert parent.poll() is None and time.monotonic() < deadline, "no cell started"
            time.sleep(0.1)
        workers = _children(parent.pid)
        assert workers
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 20
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), "workers outlived their killed parent"
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
    rerun = invoke("run", study_file, "--out", out, "--device", "cpu", "--data-dir", fake_data,
                   "--no-download", "--wandb", "disabled")
    assert rerun.exit_code == 0, rerun.output
    assert "busy: 0" in rerun.output and "failed: 0" in rerun.output
    assert all((out / c.run_name / "summary.json").exists() for c in load_study(study_file).cells)


# ------------------------------------------------------------------ 3. validation up front


@pytest.mark.parametrize("args, message", [
    (["--norm", "sparse-zca", "--norm-opt", "density=nan"], "density takes a finite number, got 'nan'"),
    (["--norm", "sparse-zca", "--norm-opt", "density=NaN"], "density takes a finite number, got nan"),
    (["--norm", "sparse-zca", "--norm-opt", "density=abc"], "density takes a finite number, got 'abc'"),
    (["--norm", "bn", "--norm-opt", "eps=inf"], "eps takes a finite number, got 'inf'"),
    (["--norm", "bn", "--norm-opt", "eps=-Infinity"], "eps takes a finite number, got -inf"),
    (["--norm", "bn", "--norm-opt", "momentum=abc"], "momentum takes a finite number or None"),
    (["--norm", "bn", "--norm-opt", "dtype=float64"], "dtype is not a norm option"),
    (["--norm", "bn", "--norm-opt", "device=cuda"], "device is not a norm option"),
    (["--norm", "zca", "--norm-opt", "process_group=1"], "process_group is not a norm option"),
    (["--norm", "zca", "--norm-opt", "shrinkage=nan"], "shrinkage must be"),
    (["--norm", "pit", "--norm-opt", "output=3"], "output takes a string, got 3"),
    (["--norm", "gn", "--norm-opt", "num_groups=5"], "does not divide"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--dropout", "1.5"], "dropout must be in [0, 1)"),
])
def test_bad_norm_options_and_settings_are_usage_errors(tmp_path, fake_data, args, message):
    result = invoke("study", *args, *SMALL, "--data-dir", fake_data, "--out", tmp_path / "r")
    assert_clean_exit(result, 2, message)
    assert not (tmp_path / "r").exists()


def test_norm_options_are_coerced_like_their_defaults(tmp_path, fake_data):
    result = invoke("study", "--norm", "zca", "--norm-opt", "eps=1", "--norm-opt", "shrinkage=0",
                    *SMALL, "--data-dir", fake_data, "--out", tmp_path / "r", "--wandb", "disabled")
    assert result.exit_code == 0, result.output
    opts = json.loads((tmp_path / "r" / "config.json").read_text())["norm_opts"]
    assert opts == {"eps": 1.0, "shrinkage": 0} and isinstance(opts["eps"], float)


@pytest.mark.parametrize("text, message", [
    ("[base]\nepochs = 1.5", "[base] epochs must be an integer, got 1.5"),
    ("[base]\nlimit_train = -3", "[base] limit_train must be at least 2, got -3"),
    ("[base]\nlimit_test = 0", "limit_test must be at least 1, got 0"),
    ("[base]\nbatch_size = \"64\"", "batch_size must be an integer, got '64'"),
    ("[base]\nlr = nan", "lr must be a finite number"),
    ("[base]\nlr = -0.1", "lr must be positive"),
    ("[base]\nbias = 1", "bias must be true or false, got 1"),
    ("[base]\nactivation = \"swish\"", "activation must be one of"),
    ("[base]\nprecise_stats = -1", "precise_stats must be at least 0"),
    ("[grid]\nepochs = [1, 2.5]", "grid.epochs (epochs-2.5) epochs must be an integer, got 2.5"),
    ("[quick]\nbase = {limit_train = -3}", "[quick] base limit_train must be at least 2"),
    ("[grid]\nnorm = [{label = \"s\", norm = \"sparse-zca\", norm_opts = {density = nan}}]",
     "density takes a finite number, got nan"),
    ("[grid]\nnorm = [{label = \"b\", norm = \"bn\", norm_opts = {device = \"cuda\"}}]",
     "device is not a norm option"),
])
def test_bad_settings_in_study_files_fail_at_load(tmp_path, text, message):
    path = _write(tmp_path / "bad.toml", 'question = "q"\n' + text)
    with pytest.raises(StudyError, match="bad.toml") as info:
        load_study(path)
    assert message in str(info.value)
    result = invoke("run", path)
    assert_clean_exit(result, 1, message)
    assert "bad.toml" in result.output


# ------------------------------------------------------------------ 4. wandb mode on resume


class FakeRun:
    def __init__(self, tmp: Path):
        self.id, self.dir, self.summary = "fake123", str(tmp / "wandb" / "files"), {}

    def log(self, *a, **k):
        pass

    def finish(self):
        pass


def _fake_wandb(monkeypatch, tmp_path, fail_online=False):
    import wandb

    calls = []

    def init(**kw):
        calls.append(kw["mode"])
        if fail_online and kw["mode"] == "online":
            raise TimeoutError("wandb init timed out")
        return FakeRun(tmp_path)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(tracking, "logged_in", lambda: False)
    return calls


def test_resume_keeps_the_wandb_mode_of_the_run(tmp_path, fake_data, monkeypatch):
    config = RunConfig(epochs=2, limit_train=64, limit_test=32, batch_size=32, precise_stats=0)
    for out in (tmp_path / "a", tmp_path / "b"):  # two runs started with --wandb disabled, killed
        train_run(config, out, data_dir=fake_data, device="cpu", download=False, echo=lambda s: None,
                  stop_after=1, wandb_mode="disabled")
    calls = _fake_wandb(monkeypatch, tmp_path)  # no $WANDB_MODE, not logged in: offline by default
    args = ["study", "--resume", "--epochs", "2", "--data-dir", fake_data, "--no-download", "--device", "cpu"]
    resumed = invoke(*args, "--out", tmp_path / "a")  # no --wandb: disabled, as the run started
    assert resumed.exit_code == 0, resumed.output
    assert calls == [] and not (tmp_path / "a" / "wandb").exists()
    assert torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["wandb_mode"] == "disabled"
    explicit = invoke(*args, "--out", tmp_path / "b", "--wandb", "offline")  # an explicit --wandb wins
    assert explicit.exit_code == 0, explicit.output
    assert calls == ["offline"]


# ------------------------------------------------------------------ 5. one wandb timeout per run


def test_a_failing_wandb_init_is_tried_once_per_run(tmp_path, fake_data, monkeypatch):
    calls = _fake_wandb(monkeypatch, tmp_path, fail_online=True)
    study_file = _write(tmp_path / "three.toml",
                        ONE_CELL.replace('question = "one cell"', 'question = "three cells"\nseeds = 3'))
    result = invoke("run", study_file, "--out", tmp_path / "runs", "--device", "cpu", "--data-dir", fake_data,
                    "--no-download", "--wandb", "online")
    assert result.exit_code == 0, result.output
    assert calls == ["online", "offline", "offline"]
    assert result.output.count("remaining cells log offline") == 1
    assert "wandb init failed" in (tmp_path / "runs" / "base-s0" / "log.txt").read_text()
    # a new run tries online again (the fallback lasts one `run`)
    calls.clear()
    run_cells(load_study(study_file, seeds=4), tmp_path / "runs", data_dir=str(fake_data), download=False,
              device="cpu", wandb_mode="online", echo=lambda s: None)
    assert calls == ["online"]
    assert not tracking.online_init_failed()


# ------------------------------------------------------------------ 6. kernel build name


def test_kernel_extension_name_hashes_source_flags_and_torch(tmp_path, monkeypatch):
    name = kernels.extension_name()
    isa, _ = kernels._instruction_set()
    assert name.startswith(f"exoticnorm_pit_cpu_{isa}_") and len(name.rsplit("_", 1)[1]) == 10
    assert kernels.extension_name() == name  # stable
    monkeypatch.setattr(torch, "__version__", "0.0.1+other")
    assert kernels.extension_name() != name
    monkeypatch.undo()
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "pit_cpu.cpp").write_text((kernels._CSRC / "pit_cpu.cpp").read_text() + "\n// edited\n")
    for header in kernels._CSRC.glob("*.h"):
        (src / header.name).write_text(header.read_text())
    monkeypatch.setattr(kernels, "_CSRC", src)
    edited = kernels.extension_name()
    assert edited != name and edited.startswith(f"exoticnorm_pit_cpu_{isa}_")
    (src / "transpose.h").write_text((src / "transpose.h").read_text() + "\n// edited\n")
    assert kernels.extension_name() != edited  # a shared header is part of the build
    monkeypatch.setattr(kernels, "_instruction_set", lambda: (isa, ["-mfoo"]))
    assert kernels.extension_name() not in (name, edited)  # other compile flags
