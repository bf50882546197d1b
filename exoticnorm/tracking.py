"""Weights & Biases logging that never stops training.

Mode: the one asked for, else ``$WANDB_MODE``, else online when logged in (``$WANDB_API_KEY``
or a netrc entry for the wandb host) and offline otherwise. Offline runs are written under the
run directory and the ``wandb sync`` line to upload them is printed. Any wandb failure (no
network, bad key) is reported once and logging is switched off; the local files stay complete.

Within one ``exoticnorm run`` (between ``remember_init_failures()`` and
``forget_init_failures()``) the first failed online ``wandb.init`` (a bad key or no network
costs its whole timeout) is remembered, also across the run's worker processes through a
shared event, and the later cells log offline instead of waiting for the same timeout again.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

__all__ = ["WandbLogger", "resolve_mode", "logged_in", "remember_init_failures",
           "forget_init_failures", "online_init_failed"]

MODES = ("online", "offline", "disabled")


class _InitFailures:
    """Whether an online wandb.init has failed in the current ``exoticnorm run``."""

    active = False  # inside a run's scope; outside it nothing is remembered
    failed = False  # in this process
    shared = None  # a multiprocessing Event shared by the run's processes, or None


_failures = _InitFailures()


def remember_init_failures(shared=None) -> None:
    """Start remembering a failed online init (the start of a ``run``; in each worker, with the
    run's shared multiprocessing Event). Forgets earlier failures."""
    _failures.active, _failures.failed, _failures.shared = True, False, shared


def forget_init_failures() -> None:
    _failures.active, _failures.failed, _failures.shared = False, False, None


def online_init_failed() -> bool:
    """An online wandb.init has failed in this run (in this process or a sibling worker)."""
    if not _failures.active:
        return False
    return _failures.failed or (_failures.shared is not None and _failures.shared.is_set())


def _mark_online_init_failed() -> None:
    if _failures.active:
        _failures.failed = True
        if _failures.shared is not None:
            _failures.shared.set()


def logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str | None) -> str:
    mode = mode or os.environ.get("WANDB_MODE") or ("online" if logged_in() else "offline")
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"unknown wandb mode {mode!r}; use one of {', '.join(MODES)}")
    return mode


class WandbLogger:
    """One wandb run for one training run; every call is a no-op once wandb has failed."""

    def __init__(
        self,
        mode: str | None,
        run_dir: Path,
        config: dict[str, Any],
        name: str,
        project: str = "exoticnorm",
        group: str | None = None,
        run_id: str | None = None,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.mode = resolve_mode(mode)
        self.echo = echo
        self.run = None
        if self.mode == "disabled":
            return
        if self.mode == "online" and online_init_failed():
            self.mode = "offline"
            echo("wandb: an online init failed earlier in this study run; logging offline "
                 "(upload later with wandb sync)")
        try:
            import wandb

            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", project),
                dir=str(run_dir),
                mode=self.mode,
                config=config,
                name=name,
                group=group,
                id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(silent=True, console="off", init_timeout=60),
            )
        except Exception as exc:  # noqa: BLE001 - wandb must never stop training
            if self.mode == "online":
                _mark_online_init_failed()
            self._fail("init", exc)

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def _fail(self, what: str, exc: Exception) -> None:
        self.echo(f"wandb {what} failed ({type(exc).__name__}: {exc}); training goes on, "
                  "local metrics and checkpoints are complete")
        self.run = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as exc:  # noqa: BLE001
            self._fail("log", exc)

    def log_activations(self, history: dict[str, Any], epoch: int) -> None:
        """The epoch's per-batch activation mean/std of each norm site as a line plot and its
        last histogram (``ActivationRecorder.state()``; the open tails drawn as ±4.5)."""
        if self.run is None:
            return
        try:
            import wandb

            n = history["steps_per_epoch"]
            rows = slice((epoch - 1) * n, epoch * n)
            edges = history["hist_edges"].clamp(-4.5, 4.5).numpy()
            media = {}
            for i, site in enumerate(history["sites"]):
                media[f"act/{site}/per_batch"] = wandb.plot.line_series(
                    xs=list(range(rows.start, rows.stop)),
                    ys=[history["mean"][rows, i].tolist(), history["std"][rows, i].tolist()],
                    keys=["mean", "std"], title=f"{site} output per batch, epoch {epoch}", xname="step")
                if len(history["hist"]):
                    media[f"act/{site}/hist"] = wandb.Histogram(np_histogram=(history["hist"][-1, i].numpy(), edges))
            self.run.log(media, step=epoch)
        except Exception as exc:  # noqa: BLE001
            self._fail("log", exc)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if self.run is None:
            return
        try:
            if summary:
                self.run.summary.update(summary)
            run_path = Path(self.run.dir).parent
            self.run.finish()
            if self.mode == "offline":
                self.echo(f"wandb: offline run saved; upload it with: wandb sync {run_path}")
        except Exception as exc:  # noqa: BLE001
            self._fail("finish", exc)
