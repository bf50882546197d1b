"""`exoticnorm run --executor ray|slurm` (issue #13, part 1): the same cells and the same numbers
as the local executor, a killed Ray run that resumes, a Ray cell that dies alone, and clear
errors (missing extra, unreachable Ray cluster, refused or impossible SLURM submission, options
of another executor). The Ray runs start a local Ray (this machine's cores) and are `-m slow`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from exoticnorm.cli import main
from exoticnorm.study import load_study
from exoticnorm.runner import run_cells

STUDY = """
question = "executors on fake data"
seeds = 1
[base]
epochs = 2
batch_size = 64
limit_train = 256
limit_test = 64
precise_stats = 0
activation = "relu"
[grid]
norm = ["bn", "none"]
"""

LONG = """
question = "two cells that take a while"
[base]
epochs = 8
batch_size = 16
limit_train = 256
limit_test = 32
precise_stats = 0
activation = "relu"
[grid]
norm = ["bn", "none"]
"""

TIMING = {"images_per_sec", "epoch_time", "elapsed"}  # the only fields that may differ
HALF = str(max(1, (os.cpu_count() or 1) // 2))  # threads per cell of `--jobs 2`


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def run_args(study, out, data, *extra):
    return ["run", study, "--out", out, "--device", "cpu", "--data-dir", data, "--no-download",
            "--wandb", "disabled", *extra]


def run_cli(*args, timeout=600):
    """`exoticnorm ...` in its own process (and session, so that what it starts can be ended)."""
    return subprocess.run([sys.executable, "-m", "exoticnorm", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, start_new_session=True)


def numbers(out: Path) -> dict:
    """Per cell: metrics.jsonl and summary.json without timings."""
    found = {}
    for cell in sorted(out.glob("*-s*")):
        metrics = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((cell / "summary.json").read_text())
        found[cell.name] = ([{k: v for k, v in m.items() if k not in TIMING} for m in metrics],
                            {k: v for k, v in summary.items() if k not in TIMING})
    return found


@pytest.fixture
def study_file(tmp_path):
    path = tmp_path / "executors.toml"
    path.write_text(STUDY)
    return path


@pytest.fixture
def local_numbers(tmp_path, study_file, fake_data):
    """The reference: the local executor, 2 processes (cores/2 threads each)."""
    out = tmp_path / "local"
    counts = run_cells(load_study(study_file), out, jobs=2, device="cpu", data_dir=str(fake_data),
                       download=False, wandb_mode="disabled", echo=lambda s: None)
    assert counts["finished"] == 2
    return numbers(out)


# ------------------------------------------------------------------ same numbers


def test_slurm_local_executor_gives_the_local_executors_numbers(tmp_path, study_file, fake_data, local_numbers):
    out = tmp_path / "slurm"
    result = invoke(*run_args(study_file, out, fake_data, "--executor", "slurm", "--slurm-cluster", "local",
                              "--slurm-cpus-per-task", HALF, "--slurm-time", "10"))
    assert result.exit_code == 0, result.output
    assert "submitit's local executor" in result.output and "finished: 2" in result.output
    assert numbers(out) == local_numbers  # CPU, same threads: bit-identical
    assert any((out / ".submitit").iterdir())  # submitit's scripts and logs, out of the cells' way
    again = invoke(*run_args(study_file, out, fake_data, "--executor", "slurm", "--slurm-cluster", "local"))
    assert again.exit_code == 0 and "2 already finished, 0 to run" in again.output


@pytest.mark.slow
def test_ray_executor_gives_the_local_executors_numbers(tmp_path, study_file, fake_data, local_numbers):
    out = tmp_path / "ray"
    result = run_cli(*run_args(study_file, out, fake_data, "--executor", "ray", "--jobs", "2"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "a local Ray" in result.stdout and "finished: 2" in result.stdout
    assert numbers(out) == local_numbers


# ------------------------------------------------------------------ kills


def _session(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a `run` started with start_new_session, and its Ray)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


def _end_session(sid: int) -> None:
    for pid in _session(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for(condition, proc, what: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stdout.read()}"
        assert time.monotonic() < deadline, f"no {what}"
        time.sleep(0.1)


def _start_run(study_file, out, fake_data, *extra):
    return subprocess.Popen([sys.executable, "-m", "exoticnorm", *map(str, run_args(study_file, out, fake_data, *extra))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_ray_run_resumes(tmp_path, fake_data):
    study_file = tmp_path / "long.toml"
    study_file.write_text(LONG)
    first, second = (c.run_name for c in load_study(study_file).cells)
    out = tmp_path / "runs"
    run = _start_run(study_file, out, fake_data, "--executor", "ray")  # one cell at a time (all cores)
    try:
        _wait_for(lambda: (out / first / "summary.json").exists() and (out / second / "checkpoint.pt").exists(),
                  run, "finished first cell and checkpoint of the second")
        run.send_signal(signal.SIGKILL)
        run.wait(10)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(10)
        _end_session(run.pid)  # Ray's processes, had they outlived their driver
    assert not (out / second / "summary.json").exists()
    rerun = run_cli(*run_args(study_file, out, fake_data, "--executor", "ray"))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "1 already finished, 1 to run" in rerun.stdout
    assert f"{second}: finished" in rerun.stdout and "resumed" in rerun.stdout
    assert json.loads((out / second / "summary.json").read_text())["epochs_done"] == 8


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_ray_cell_whose_worker_dies_fails_alone(tmp_path, fake_data):
    study_file = tmp_path / "long.toml"
    study_file.write_text(LONG)
    victim, other = (c.run_name for c in load_study(study_file).cells)
    out = tmp_path / "runs"
    run = _start_run(study_file, out, fake_data, "--executor", "ray", "--jobs", "2")  # both at once
    try:
        _wait_for(lambda: (out / victim / "checkpoint.pt").exists(), run, "checkpoint of the victim")
        worker = int((out / victim / ".lock").read_text())  # the process running the cell
        assert worker in _session(run.pid) and worker != run.pid
        os.kill(worker, signal.SIGKILL)
        output, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(10)
        _end_session(run.pid)
    assert run.returncode == 1, output
    assert "finished: 1" in output and "failed: 1" in output
    assert f"{victim}: failed worker died" in output
    assert (out / other / "summary.json").exists() and not (out / victim / "summary.json").exists()


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("executor, module", [("ray", "ray"), ("slurm", "submitit")])
def test_a_missing_extra_is_named(tmp_path, study_file, fake_data, monkeypatch, executor, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    out = tmp_path / "runs"
    result = invoke(*run_args(study_file, out, fake_data, "--executor", executor))
    assert result.exit_code == 1, result.output
    assert f"pip install 'exoticnorm[{executor}]'" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_an_unreachable_ray_address_fails_and_writes_nothing(tmp_path, study_file, fake_data):
    out = tmp_path / "runs"
    result = invoke(*run_args(study_file, out, fake_data, "--executor", "ray", "--ray-address", "127.0.0.1:1"))
    assert result.exit_code == 1, result.output
    assert "Ray cluster" in result.output and "127.0.0.1:1" in result.output and "--ray-address" in result.output
    assert not out.exists()


SBATCH = """#!/bin/sh
cp "$1" "$(dirname "$0")/submitted.sh"
echo "sbatch: error: invalid partition specified: nope" >&2
exit 1
"""


def test_a_refused_slurm_submission_is_a_clear_error(tmp_path, study_file, fake_data, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, text in (("sbatch", SBATCH), ("srun", "#!/bin/sh\nexit 0\n")):
        (bin_dir / tool).write_text(text)
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = invoke(*run_args(study_file, tmp_path / "runs", fake_data, "--executor", "slurm",
                              "--slurm-partition", "nope", "--slurm-time", "30", "--slurm-gpus-per-task", "1",
                              "--slurm-cpus-per-task", "2", "--slurm-array-parallelism", "1"))
    assert result.exit_code == 1, result.output
    assert "SLURM refused the submission of 2 cell(s)" in result.output
    assert "invalid partition specified: nope" in result.output and "Traceback" not in result.output
    script = (bin_dir / "submitted.sh").read_text()
    for line in ("--job-name=exoticnorm-executors", "--partition=nope", "--array=0-1%1", "--time=30",
                 "--gpus-per-task=1", "--cpus-per-task=2"):
        assert f"#SBATCH {line}\n" in script, script
    assert not list((tmp_path / "runs").glob("*-s*/summary.json"))


def test_slurm_without_sbatch_says_what_to_do(tmp_path, study_file, fake_data, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = invoke(*run_args(study_file, tmp_path / "runs", fake_data, "--executor", "slurm"))
    assert result.exit_code == 1, result.output
    assert "sbatch and srun not found" in result.output and "--slurm-cluster local" in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, message", [
    (["--slurm-partition", "gpu"], "--slurm-partition applies to --executor slurm, not local"),
    (["--executor", "slurm", "--ray-address", "head:6379"], "--ray-address applies to --executor ray, not slurm"),
    (["--executor", "ray", "--slurm-time", "5"], "--slurm-time applies to --executor slurm, not ray"),
    (["--executor", "slurm", "--jobs", "2"], "--jobs applies to the local and ray executors"),
    (["--executor", "dask"], "Invalid value for '--executor'"),
])
def test_options_of_another_executor_are_usage_errors(tmp_path, study_file, fake_data, args, message):
    result = invoke(*run_args(study_file, tmp_path / "runs", fake_data, *args))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "runs").exists()
