"""Weights & Biases logging that never stops training.

Mode: the one asked for, else ``$WANDB_MODE``, else online when logged in (``$WANDB_API_KEY``
or a netrc entry for the wandb host) and offline otherwise. Offline runs are written under the
run directory and the ``wandb sync`` line to upload them is printed. Any wandb failure (no
network, bad key) is reported once and logging is switched off; the local files stay complete.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

__all__ = ["WandbLogger", "resolve_mode", "logged_in"]

MODES = ("online", "offline", "disabled")


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
