"""Where ``exoticnorm run`` runs a study's cells: ``--executor local|ray|slurm``.

``local`` (the default) is runner.run_cells's own loop or process pool (``--jobs``) and needs
nothing more. ``RayExecutor`` runs each cell as one Ray task, ``SlurmExecutor`` as one task of
a submitit job array. A cell is always ``runner._run_cell``: it takes the lock of its folder in
the runs folder and writes there exactly as a local run does, so skipping finished cells,
resuming killed ones and ``exoticnorm report`` work unchanged, provided the runs folder is
storage that every node sees (a shared file system).

Both are context managers: entering connects (Ray) or checks the submission tools (SLURM),
before anything is written; ``run`` yields each cell's result as it ends; leaving with an
exception (Ctrl-C) cancels the cells still queued or running.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["ExecutorError", "RayExecutor", "SlurmExecutor", "make_executor"]

CONNECT_TIMEOUT_S = 10  # to reach a Ray cluster, with the time to import ray
FORWARDED_ENV = ("EXOTICNORM_DATA", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY")  # to Ray workers


class ExecutorError(RuntimeError):
    """The executor cannot start or submit; the message says what to do."""


def _require(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ExecutorError(f"--executor {extra} needs the {module} package: "
                            f"pip install 'exoticnorm[{extra}]'") from exc


def _died(exc: BaseException) -> dict:
    """The result of a cell whose process died or was cancelled."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return {"status": "failed", "error": f"worker died: {type(exc).__name__}: {first}", "seconds": 0.0}


def _call(run_cell: Callable[..., dict], cell, threads: int) -> dict:
    """One cell in a Ray worker."""
    return run_cell(cell, threads=threads)


class RayExecutor:
    """Each cell one Ray task (no retries): one GPU (and one CPU) where the cluster has GPUs and
    ``device`` is not cpu, else cores/``jobs`` CPUs, cores being the smallest node's CPUs.
    ``address`` None or "local" starts a local Ray with this machine's cores for the run."""

    def __init__(self, address: str | None = None, jobs: int = 1, device: str = "auto"):
        self.address, self.jobs, self.device = address or "local", jobs, device
        self._pending: dict = {}

    def __enter__(self) -> RayExecutor:
        ray = self.ray = _require("ray", "ray")
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        kwargs = dict(logging_level=logging.ERROR, log_to_driver=False,
                      runtime_env={"env_vars": env} if env else None)
        if self.address == "local":
            kwargs.update(num_cpus=os.cpu_count() or 1, include_dashboard=False)
        else:
            _probe_ray(self.address)
        try:
            ray.init(address=self.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ExecutorError(f"cannot start Ray at {self.address}: {exc}") from exc
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        cores = int(min((r["CPU"] for r in nodes if r.get("CPU")), default=1))
        if self.device != "cpu" and any(r.get("GPU") for r in nodes):
            self.options, self.threads = {"num_gpus": 1, "num_cpus": 1}, 1
        else:
            self.threads = max(1, cores // self.jobs)
            self.options = {"num_cpus": self.threads}
        where = f"a local Ray ({cores} CPUs)" if self.address == "local" else f"the Ray cluster at {self.address}"
        per_cell = "1 GPU" if "num_gpus" in self.options else f"{self.threads} CPU(s)"
        self.description = f"{where}, {per_cell} per cell"
        return self

    def run(self, cells: list, run_cell: Callable[..., dict]) -> Iterator[tuple]:
        """Submit every cell; yield (cell, result) as each task ends."""
        task = self.ray.remote(_call).options(max_retries=0, **self.options)
        self._pending = {task.remote(run_cell, cell, self.threads): cell for cell in cells}
        while self._pending:
            done, _ = self.ray.wait(list(self._pending), num_returns=1, timeout=1.0)
            for ref in done:
                cell = self._pending.pop(ref)
                try:
                    result = self.ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the worker died, was killed or cancelled
                    result = _died(exc)
                yield cell, result

    def __exit__(self, *exc_info) -> None:
        for ref in self._pending:  # left early (Ctrl-C): stop the cells still queued or running
            self.ray.cancel(ref, force=True)
        self._pending = {}
        self.ray.shutdown()


LOG_PREFIX = re.compile(r"^\[[^]]*\] \S+:\d+: ")
PROBE = "import sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)"


def _probe_ray(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Connect once in a child process, which is killed after ``timeout`` seconds: ray.init
    itself retries an unreachable address for minutes. The error quotes Ray's last message."""
    fix = ("check --ray-address / $RAY_ADDRESS (`ray status` on the head node shows it) and the "
           "cluster's auth token, or leave both unset to start a local Ray for the run")
    try:
        probe = subprocess.run([sys.executable, "-c", PROBE, address], capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ExecutorError(f"no Ray cluster answered at {address} within {timeout:.0f} s"
                            f"{_last_line(exc.stderr)}; {fix}") from None
    if probe.returncode:
        raise ExecutorError(f"cannot connect to a Ray cluster at {address}"
                            f"{_last_line(probe.stderr) or f' (exit code {probe.returncode})'}; {fix}")


def _last_line(stderr: bytes | None) -> str:
    """`` (Ray's last message)``, without its log prefix ``[time W pid tid] file:line:``; or ""."""
    lines = [line.strip() for line in (stderr or b"").decode(errors="replace").splitlines() if line.strip()]
    return " (" + LOG_PREFIX.sub("", lines[-1]) + ")" if lines else ""


class SlurmExecutor:
    """The cells as one SLURM job array, through submitit, named ``name`` (what squeue shows);
    its scripts and logs go to ``folder``. ``cluster="local"`` is submitit's local executor:
    every cell a process on this machine at once (array parallelism and partition do not
    apply), for trying a study's setup without SLURM. Torch gets ``cpus_per_task`` threads."""

    def __init__(self, name: str, folder: Path, partition: str | None = None, minutes: int = 120,
                 gpus_per_task: int = 0, cpus_per_task: int = 1, array_parallelism: int = 256,
                 cluster: str = "slurm"):
        self.name, self.folder, self.cluster = name, Path(folder), cluster
        self.partition, self.minutes, self.gpus = partition, minutes, gpus_per_task
        self.cpus, self.parallelism = cpus_per_task, array_parallelism
        self._jobs: list = []
        where = "submitit's local executor" if cluster == "local" else f"SLURM job array {name}"
        gpus = f" and {gpus_per_task} GPU(s)" if gpus_per_task else ""
        self.description = f"{where}, {cpus_per_task} CPU(s){gpus} per cell"

    def __enter__(self) -> SlurmExecutor:
        self.submitit = _require("submitit", "slurm")
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if self.cluster == "slurm" and missing:
            raise ExecutorError(f"--executor slurm: {' and '.join(missing)} not found; run on a SLURM "
                                "login node, or try the study here with --slurm-cluster local")
        return self

    def run(self, cells: list, run_cell: Callable[..., dict]) -> Iterator[tuple]:
        """Submit the array; yield (cell, result) as each task ends."""
        if not cells:
            return
        executor = self.submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        params = {"name": self.name, "timeout_min": self.minutes, "cpus_per_task": self.cpus}
        if self.cluster == "slurm":
            params.update(slurm_partition=self.partition, slurm_array_parallelism=self.parallelism,
                          slurm_gpus_per_task=self.gpus or None)
        else:
            params.update(gpus_per_node=self.gpus)
        executor.update_parameters(**params)
        utils = self.submitit.core.utils
        errors = (utils.FailedJobError, utils.FailedSubmissionError, OSError)  # sbatch failed or is missing
        try:
            with executor.batch():
                jobs = [executor.submit(run_cell, cell, threads=self.cpus) for cell in cells]
        except errors as exc:
            raise ExecutorError(f"SLURM refused the submission of {len(cells)} cell(s): "
                                f"{str(exc).strip() or type(exc).__name__}; check --slurm-partition, "
                                "--slurm-time and --slurm-gpus-per-task against `sinfo`") from exc
        self._jobs = jobs
        cell_of = {job.job_id: cell for job, cell in zip(jobs, cells)}
        poll = 0.5 if self.cluster == "local" else 10.0
        for job in self.submitit.helpers.as_completed(jobs, poll_frequency=poll):
            try:
                result = job.result()
            except Exception as exc:  # noqa: BLE001 - killed, timed out, cancelled, node failure
                result = _died(exc)
            yield cell_of[job.job_id], result
        self._jobs = []

    def __exit__(self, *exc_info) -> None:
        for job in self._jobs:  # left early (Ctrl-C): cancel the cells still queued or running
            if not job.done():
                job.cancel(check=False)
        self._jobs = []


def make_executor(name: str, *, study_name: str, runs: Path, jobs: int, device: str, ray_address=None,
                  slurm_partition=None, slurm_time=120, slurm_gpus_per_task=0, slurm_cpus_per_task=1,
                  slurm_array_parallelism=256, slurm_cluster="slurm"):
    """The executor of ``exoticnorm run --executor name``, to enter (it connects); for local,
    a context that gives None."""
    if name == "ray":
        return RayExecutor(ray_address, jobs=jobs, device=device)
    if name == "slurm":
        return SlurmExecutor(f"exoticnorm-{study_name}", runs / ".submitit", slurm_partition, slurm_time,
                             slurm_gpus_per_task, slurm_cpus_per_task, slurm_array_parallelism, slurm_cluster)
    return contextlib.nullcontext()
