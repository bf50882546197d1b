"""Run a study's cells: skip finished ones, resume killed ones, optionally in parallel.

Each cell is one ``train_run`` in ``OUT/<cell>-s<seed>`` (its console output in ``log.txt``
there) and one wandb run in the group named after the study. A cell whose folder holds a run
made with other settings is never touched: it is reported, and the study goes on. A cell is
run under its folder's lock (``train.run_dir_lock``): a cell another process is running is
reported "busy" and left alone.

With ``jobs`` > 1 the cells run in worker processes that die with the ``exoticnorm run`` that
started them (also on ``kill -9``): on Linux the kernel kills them (``prctl(PR_SET_PDEATHSIG)``),
and everywhere a watchdog thread in each worker ends it once its parent is gone. Orphans would
otherwise go on training, hold their cells' locks (a rerun then reports them busy) and idle.

If an online ``wandb.init`` fails (bad key, no network: each attempt costs a timeout), the
remaining cells of the run log offline (tracking.py); the run says so once.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import dataclasses
import functools
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from . import tracking
from .study import Cell, Study, StudyError
from .train import RunDirBusy, RunError, run_dir_lock, train_run

__all__ = ["cell_state", "run_cells", "run_one_cell", "select_shard"]


def select_shard(cells: list[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """Cells ``i-1, i-1+n, …`` of the study's order for shard ``i/n``: every cell in exactly one
    shard, each shard a mix of grid points and seeds."""
    if shard is None:
        return cells
    i, n = shard
    return cells[i - 1 :: n]


def cell_state(cell: Cell, out: Path) -> str:
    """"done" (summary.json), "partial" (checkpoint to resume), "new", or "mismatch" (the folder
    holds a run made with other settings; an unfinished run may differ in epochs only, as
    resuming it runs to the new count)."""
    d = out / cell.run_name
    config_path = d / "config.json"
    finished = (d / "summary.json").exists()
    if config_path.exists():
        try:
            saved = json.loads(config_path.read_text())
        except json.JSONDecodeError:
            saved = None
        wanted = json.loads(json.dumps(dataclasses.asdict(cell.config)))
        if saved is not None and (saved != wanted if finished else
                                  {**saved, "epochs": 0} != {**wanted, "epochs": 0}):
            return "mismatch"
    if finished:
        return "done"
    if (d / "checkpoint.pt").exists():
        return "partial"
    return "new"


def _run_cell(study_name: str, cell: Cell, out: str, device: str, data_dir: str | None,
              wandb_mode: str | None, download: bool, threads: int, data=None) -> dict:
    """One cell, in this process; output to the cell's log.txt. Returns a short result. A cell
    another process is running (its lock is held) is left alone."""
    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(out) / cell.run_name
    try:
        with run_dir_lock(run_dir):
            return _run_locked(study_name, cell, run_dir, device, data_dir, wandb_mode, download, data)
    except RunDirBusy as exc:
        return {"status": "busy", "error": str(exc), "seconds": 0.0}
    except RunError as exc:  # the folder cannot be made or written
        return {"status": "failed", "error": str(exc), "seconds": 0.0}


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent_pid: int) -> None:
    """End this worker when the process that started it ends, however it ends."""
    if sys.platform.startswith("linux"):
        try:  # the kernel sends SIGKILL when the parent (the thread that spawned us) exits
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watchdog() -> None:  # other systems, and a second line of defence
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watchdog, name="exoticnorm-parent-watchdog", daemon=True).start()


def _worker_init(parent_pid: int, wandb_failed) -> None:
    _die_with_parent(parent_pid)
    tracking.remember_init_failures(wandb_failed)


def _run_locked(study_name, cell, run_dir, device, data_dir, wandb_mode, download, data) -> dict:
    resume = (run_dir / "checkpoint.pt").exists()
    orphan = run_dir / "metrics.jsonl"
    if not resume and orphan.exists():  # killed between an epoch's metrics and its checkpoint
        orphan.rename(run_dir / f"metrics.jsonl.killed-{time.strftime('%Y%m%d-%H%M%S')}")
    t0 = time.perf_counter()
    with (run_dir / "log.txt").open("a") as log:
        def echo(msg: str) -> None:
            log.write(msg + "\n")
            log.flush()
        try:
            summary = train_run(
                cell.config, run_dir, device=device, data_dir=data_dir, wandb_mode=wandb_mode,
                resume=resume, download=download, echo=echo, group=study_name, data=data,
                name=cell.run_name,
                wandb_config={"study": study_name, "cell": cell.key, **dict(cell.labels)},
            )
        except Exception as exc:  # noqa: BLE001 - one failed cell must not stop the study
            echo(f"failed: {type(exc).__name__}: {exc}")
            return {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                    "seconds": time.perf_counter() - t0}
    return {"status": summary["status"], "test_acc_running": summary.get("test_acc_running"),
            "test_acc_precise": summary.get("test_acc_precise"),
            "seconds": time.perf_counter() - t0, "resumed": resume}


def run_cells(
    study: Study,
    out: Path,
    jobs: int = 1,
    shard: tuple[int, int] | None = None,
    device: str = "auto",
    data_dir: str | None = None,
    wandb_mode: str | None = None,
    download: bool = True,
    echo: Callable[[str], None] = print,
    executor=None,
) -> dict[str, int]:
    """Run every cell of ``study`` (in ``shard``) not yet finished under ``out``; return counts
    of cells by outcome. ``jobs`` > 1 runs cells in that many processes, each with
    cores/jobs torch threads. An entered ``executor`` (executors.py: Ray, SLURM) runs them
    instead."""
    if jobs < 1:
        raise StudyError(f"--jobs must be at least 1, got {jobs}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps({
        "name": study.name, "file": str(study.path), "quick": study.quick, "question": study.question,
        "seeds": study.seeds, "axes": {a: [label for label, _ in v] for a, v in study.axes.items()},
    }, indent=2) + "\n")
    cells = select_shard(study.cells, shard)
    counts = {"done": 0, "finished": 0, "diverged": 0, "failed": 0, "mismatch": 0, "busy": 0}
    todo = []
    for cell in cells:
        state = cell_state(cell, out)
        if state == "done":
            counts["done"] += 1
        elif state == "mismatch":
            counts["mismatch"] += 1
            echo(f"skip {cell.run_name}: {out / cell.run_name} holds a run made with other settings "
                 "(it is kept); move it away, or run the study with another --out")
        else:
            todo.append(cell)
    where = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    echo(f"study {study.name}{where}: {len(cells)} cells, {counts['done']} already finished, "
         f"{len(todo)} to run in {out} with {executor.description if executor else f'{jobs} job(s)'}")
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    args = (study.run_dir_name, str(out), device, data_dir, wandb_mode, download, threads)
    said_offline = False

    def report(i: int, cell: Cell, result: dict) -> None:
        nonlocal said_offline
        counts[result["status"] if result["status"] in counts else "failed"] += 1
        detail = (f"test {result['test_acc_running']:.4f} running, {result['test_acc_precise']:.4f} precise"
                  if result.get("test_acc_precise") is not None
                  else result.get("error", ""))
        echo(f"[{i}/{len(todo)}] {cell.run_name}: {result['status']} {detail} "
             f"({result['seconds']:.0f} s{', resumed' if result.get('resumed') else ''})")
        if not said_offline and tracking.online_init_failed():
            said_offline = True
            where = f"{out / cell.run_name / 'log.txt'}" + (" or another cell's" if jobs > 1 else "")
            echo(f"wandb: online init failed (the reason is in {where}); the remaining cells log "
                 "offline; upload them later with wandb sync")

    if executor is not None:
        if todo:  # find (or download) the dataset once, not in every task at the same time
            _cached_data({}, todo[0], device, data_dir, download)
        run_cell = functools.partial(  # absolute paths: tasks may start in another folder
            _run_cell, study.run_dir_name, out=str(out.resolve()), device=device,
            data_dir=data_dir and str(Path(data_dir).resolve()), wandb_mode=wandb_mode, download=download)
        for i, (cell, result) in enumerate(executor.run(todo, run_cell), 1):
            report(i, cell, result)
    elif jobs == 1:
        tracking.remember_init_failures()
        try:
            cache: dict = {}
            for i, cell in enumerate(todo, 1):
                data = _cached_data(cache, cell, device, data_dir, download)
                report(i, cell, _run_cell(args[0], cell, *args[1:], data=data))
        finally:
            tracking.forget_init_failures()
    else:
        if todo:  # find (or download) the dataset once, not in every worker at the same time
            _cached_data({}, todo[0], device, data_dir, download)
        ctx = multiprocessing.get_context("spawn")
        wandb_failed = ctx.Event()
        tracking.remember_init_failures(wandb_failed)
        try:
            with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                                        initargs=(os.getpid(), wandb_failed)) as pool:
                futures = {pool.submit(_run_cell, args[0], cell, *args[1:]): cell for cell in todo}
                for i, fut in enumerate(cf.as_completed(futures), 1):
                    try:
                        result = fut.result()
                    except Exception as exc:  # noqa: BLE001 - a worker killed (e.g. out of memory)
                        result = {"status": "failed", "error": f"worker died: {type(exc).__name__}: {exc}",
                                  "seconds": 0.0}
                    report(i, futures[fut], result)
        finally:
            tracking.forget_init_failures()
    return counts


def run_one_cell(study: Study, cell: Cell, out: Path, device: str = "auto",
                 data_dir: str | None = None, wandb_mode: str | None = None,
                 download: bool = True) -> dict:
    """One cell in this process (``exoticnorm run-cell``, e.g. under ``wandb agent``)."""
    state = cell_state(cell, out)
    if state == "mismatch":
        raise StudyError(f"{out / cell.run_name} holds a run made with other settings; move it away")
    if state == "done":
        return {"status": "done"}
    return _run_cell(study.run_dir_name, cell, str(out), device, data_dir, wandb_mode, download, 0)


def _cached_data(cache: dict, cell: Cell, device: str, data_dir: str | None, download: bool):
    """One copy of the dataset per (limits) in a sequential study; None lets train_run load it
    (and report a missing dataset as that cell's error)."""
    from .data import DatasetNotFound, load_fashion_mnist
    from .train import pick_device

    key = (cell.config.limit_train, cell.config.limit_test)
    if key not in cache:
        try:
            cache.clear()
            cache[key] = load_fashion_mnist(data_dir, pick_device(device), download, *key)
        except (DatasetNotFound, RunError):
            return None
    return cache[key]
