"""One run: train the d2l LeNet with a norm on FashionMNIST, log, checkpoint, resume.

A run directory holds ``config.json``, ``metrics.jsonl`` (one line per epoch),
``checkpoint.pt`` (after every epoch; ``torch.load(..., weights_only=True)``) and, once
finished, ``summary.json``. A run holds an exclusive lock on the directory (``flock`` on its
``.lock`` file, see ``run_dir_lock``) from start to end, so two runs never write to one
directory. Shuffling uses a generator seeded per epoch and the RNG state is
checkpointed, so a resumed run ends with the metrics of an uninterrupted one on the CPU.

Under several processes (torchrun, see ``exoticnorm.distributed``) one model trains with
DistributedDataParallel: every rank draws the same shuffled order and trains on its shard of
each global batch of ``batch_size``, the norms sync their statistics, every rank evaluates
the whole test set, and rank 0 alone holds the lock and writes files and wandb.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import inspect
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, registry
from .data import FashionMNIST, load_fashion_mnist
from .models import LeNet
from .models.lenet import ACTIVATIONS, LAYER_SETS, NORM_SITES
from .activations import ActivationRecorder
from .precise import precise_statistics
from .tracking import WandbLogger

__all__ = ["RunConfig", "RunError", "RunDirBusy", "train_run", "run_dir_lock", "pick_device",
           "check_setting", "check_norm_option", "check_norm_opts", "OPTIMIZERS"]

CHECKPOINT_FORMAT = "exoticnorm-checkpoint"
CHECKPOINT_VERSION = 1
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
RESUMABLE_CHANGES = {"epochs"}  # config fields a resume may change


class RunError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


class RunDirBusy(RunError):
    """The run directory is locked by another process (a run in progress)."""


# --------------------------------------------------------------------- settings and norm options

MODELS = {"lenet": None, "resnet8": 1, "resnet20": 3}  # model → residual blocks per stage
RESNET_WIDTH = 8  # channels of the first stage: half of He et al. 2016's 16, so a 2-core CPU trains it

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_setting(name: str, value: Any, minimum: int | None, optional: bool = False) -> int | None:
    if optional and value is None:
        return None
    if not _is_int(value):
        raise RunError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise RunError(f"{name} must be at least {minimum}, got {value!r}")
    return value


def _float_setting(name: str, value: Any) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise RunError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _choice_setting(name: str, value: Any, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise RunError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_setting(name: str, value: Any) -> Any:
    """One RunConfig field checked with the rules of the CLI option of the same name (type
    and range): the value (ints given for floats become floats), or RunError naming the field.
    ``norm_opts`` is only checked to be a table here; its values need the norm (see
    ``check_norm_opts``)."""
    if name in ("epochs", "batch_size"):
        return _int_setting(name, value, 1)
    if name == "precise_stats":
        return _int_setting(name, value, 0)
    if name == "seed":
        return _int_setting(name, value, None)
    if name == "limit_train":
        return _int_setting(name, value, 2, optional=True)
    if name == "limit_test":
        return _int_setting(name, value, 1, optional=True)
    if name == "lr":
        value = _float_setting(name, value)
        if not value > 0:
            raise RunError(f"lr must be positive, got {value!r}")
        return value
    if name == "weight_decay":
        value = _float_setting(name, value)
        if value < 0:
            raise RunError(f"weight_decay must be at least 0, got {value!r}")
        return value
    if name == "dropout":
        value = _float_setting(name, value)
        if not 0.0 <= value < 1.0:
            raise RunError(f"dropout must be in [0, 1), got {value!r}")
        return value
    if name == "bias":
        if not isinstance(value, bool):
            raise RunError(f"bias must be true or false, got {value!r}")
        return value
    if name == "optimizer":
        return _choice_setting(name, value, OPTIMIZERS)
    if name == "activation":
        return _choice_setting(name, value, ("auto", *ACTIVATIONS))
    if name == "model":
        return _choice_setting(name, value, tuple(MODELS))
    if name == "norm":
        if not isinstance(value, str) or not value:
            raise RunError(f"norm must be a registered norm name, got {value!r}")
        return value
    if name == "norm_layers":
        if isinstance(value, list) and value and all(isinstance(v, str) and v in NORM_SITES for v in value):
            return value
        if isinstance(value, list):
            raise RunError(f"norm_layers as a list must name sites from {', '.join(NORM_SITES)}, got {value!r}")
        return _choice_setting(name, value, tuple(LAYER_SETS))
    if name == "norm_opts":
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise RunError(f"norm_opts must be a table of options, got {value!r}")
        return value
    raise RunError(f"unknown setting {name!r}")


# options a run sets itself: the device comes from --device, the model trains in float32, its
# norms synced over all processes of a torchrun run; as norm options they would only produce a
# model on the wrong device, a crash or a half-synced run
NOT_NORM_OPTIONS = ("device", "dtype", "process_group")
_KIND_WORDS = {"bool": "true or false", "int": "an integer", "float": "a finite number",
               "str": "a string", "None": "None"}


def _option_kinds(param: inspect.Parameter) -> list[str] | None:
    """The kinds of value (bool, int, float, str, None) an option takes, from its annotation,
    else its default; None when they cannot be told (no check then)."""
    ann = param.annotation
    if ann is inspect.Parameter.empty:
        default = param.default
        for kind in (bool, int, float, str):
            if type(default) is kind:
                return [kind.__name__]
        return None
    text = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
    kinds = [t.strip() for t in text.replace("Optional[", "").rstrip("]").split("|")]
    kinds = ["None" if k in ("None", "NoneType") else k for k in kinds]
    return kinds if all(k in _KIND_WORDS for k in kinds) else None


def check_norm_option(norm: str, key: str, value: Any) -> Any:
    """One option of norm ``norm``: the value, typed like the option (an int for a float option
    becomes a float), or NormConfigError naming the option. Non-finite numbers, values of the
    wrong kind and the options a run sets itself (device, dtype, process_group) are refused;
    an unknown option is left to ``registry.create_norm`` (which suggests the right name)."""
    if key in NOT_NORM_OPTIONS:
        raise registry.NormConfigError(
            f"{key} is not a norm option here: exoticnorm places the model on --device, trains "
            "it in float32 and syncs its norms over all processes of the run")
    if isinstance(value, float) and not math.isfinite(value):
        raise registry.NormConfigError(f"{key} takes a finite number, got {value!r}")
    options = registry.norm_options(norm)
    kinds = _option_kinds(options[key]) if key in options else None
    if kinds is None:
        return value
    if "bool" in kinds and isinstance(value, bool):
        return value
    if "None" in kinds and value is None:
        return value
    if "int" in kinds and _is_int(value):
        return value
    if "float" in kinds and _is_number(value):
        return float(value)
    if "str" in kinds and isinstance(value, str):
        return value
    words = " or ".join(_KIND_WORDS[k] for k in sorted(kinds, key=list(_KIND_WORDS).index))
    raise registry.NormConfigError(f"{key} takes {words}, got {value!r}")


def check_norm_opts(norm: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Every option in ``opts`` checked by ``check_norm_option``; the typed options."""
    return {key: check_norm_option(norm, key, value) for key, value in opts.items()}


@dataclass
class RunConfig:
    """Everything that defines a run's result (the device and paths do not)."""

    norm: str = "bn"
    norm_opts: dict[str, Any] = field(default_factory=dict)
    model: str = "lenet"  # lenet (d2l's) or resnet8 / resnet20 (exoticnorm.models.resnet, width 8)
    norm_layers: str = "all"
    dropout: float = 0.0
    bias: bool = True
    activation: str = "auto"  # the model's own: sigmoid for lenet (d2l), relu for the resnets
    epochs: int = 10
    lr: float = 0.1
    batch_size: int = 128
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    seed: int = 0
    limit_train: int | None = None
    limit_test: int | None = None
    precise_stats: int = 100  # training batches for the precise-statistics eval protocol

    def __post_init__(self) -> None:
        """Every field checked with the CLI's rules (``check_setting``), the norm options typed
        for the norm (``check_norm_opts``; unknown norms and options fail in build_model)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_setting(f.name, getattr(self, f.name)))
        if self.activation == "auto":
            self.activation = "sigmoid" if self.model == "lenet" else "relu"
        if self.model != "lenet" and self.norm_layers not in ("all", "none"):
            raise RunError(f"norm_layers {self.norm_layers!r} names LeNet sites; {self.model} takes "
                           "all (a norm after every conv) or none")
        if self.norm_opts and self.norm in registry.available_norms():
            try:
                self.norm_opts = check_norm_opts(self.norm, self.norm_opts)
            except registry.NormConfigError as exc:
                raise RunError(f"norm_opts: {exc}") from exc

    def build_model(self) -> nn.Module:
        kw = dict(norm=self.norm, norm_kwargs=self.norm_opts, norm_layers=self.norm_layers,
                  dropout=self.dropout, bias=self.bias, activation=self.activation)
        if self.model == "lenet":
            return LeNet(**kw)
        from .models.resnet import ResNet

        return ResNet(**kw, width=RESNET_WIDTH, blocks_per_stage=MODELS[self.model])


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for but CUDA is not available; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise RunError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N") from exc


def _optimizer(config: RunConfig, params) -> torch.optim.Optimizer:
    kw = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, **kw)
    if config.optimizer == "momentum":
        return torch.optim.SGD(params, momentum=0.9, **kw)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, **kw)
    return torch.optim.AdamW(params, **kw)


def _train_size(n_data: int, batch_size: int) -> int:
    """The training images an epoch uses: all but one when the last batch would hold one only
    (a batch statistic of one value is undefined), so a different example sits out each epoch."""
    return n_data - 1 if n_data % batch_size == 1 and n_data > 1 else n_data


def _train_epoch(model: nn.Module, optimizer, data: FashionMNIST, order, batch_size: int,
                 stats: ActivationRecorder, label: str) -> tuple[float, float]:
    """One pass over ``order`` in global batches of ``batch_size``, each rank training on its
    shard of every batch; the summed loss and the count of correct predictions over all ranks."""
    loss_sum = torch.zeros((), device=order.device)
    correct = torch.zeros((), device=order.device)
    steps, world = math.ceil(len(order) / batch_size), distributed.world_size()
    with _progress(steps, label) as bar:
        for step in range(steps):
            batch = order[step * batch_size : (step + 1) * batch_size]
            idx = distributed.shard(batch)
            x, y = data.train_x[idx], data.train_y[idx]
            stats.step = step
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            # DDP averages the ranks' gradients; weighting each shard's mean loss by its share of
            # the batch makes that the gradient of the batch's mean (a weight of 1 in one process)
            (loss * (len(idx) * world / len(batch))).backward()
            optimizer.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.detach().argmax(1) == y).sum()
            bar.update(1)
    loss_total, correct_total = distributed.all_sum(torch.stack([loss_sum, correct])).tolist()
    return loss_total, correct_total


def _evaluate(model: nn.Module, x, y, batch_size: int = 1024) -> tuple[float, float]:
    model.eval()
    loss, correct = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits = model(x[i : i + batch_size])
            loss += F.cross_entropy(logits, y[i : i + batch_size], reduction="sum")
            correct += (logits.argmax(1) == y[i : i + batch_size]).sum()
    return loss.item() / len(x), correct.item() / len(x)


EVAL_KEYS = ("test_loss_running", "test_acc_running", "test_loss_precise", "test_acc_precise", "precise_norms")


def evaluate_both(net: nn.Module, batches, x, y) -> dict[str, float]:
    """The two eval protocols, the same for every norm: with the running statistics as
    training left them (d2l), and with "precise" statistics recomputed from ``batches`` with
    the final weights (``precise_statistics`` over every norm that keeps statistics). The
    running statistics are restored afterwards, so evaluating never changes training.
    ``test_acc``/``test_loss`` alias the precise numbers; ``precise_norms`` = 0 means the model
    keeps no statistics (or no batches were given) and the two protocols coincide."""
    loss_run, acc_run = _evaluate(net, x, y)
    saved = {name: b.clone() for name, b in net.named_buffers()}
    try:
        recomputed = precise_statistics(net, batches, only_flagged=False)
        loss_pre, acc_pre = _evaluate(net, x, y) if recomputed else (loss_run, acc_run)
    finally:
        with torch.no_grad():
            for name, b in net.named_buffers():
                b.copy_(saved[name])
    return {"test_loss": loss_pre, "test_acc": acc_pre, "test_loss_running": loss_run,
            "test_acc_running": acc_run, "test_loss_precise": loss_pre, "test_acc_precise": acc_pre,
            "precise_norms": recomputed}


def _epoch_of(line: str) -> int | None:
    """The epoch of a metrics.jsonl line; None for a line half-written by a killed run."""
    try:
        return json.loads(line)["epoch"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def _progress(total: int, label: str):
    """A progress bar on a TTY only (and rank 0's only); a no-op context elsewhere (logs, CI)."""
    import click

    if sys.stderr.isatty() and distributed.rank() == 0:
        return click.progressbar(length=total, label=label, file=sys.stderr)

    class _Silent:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            pass

    return _Silent()


LOCK_FILE = ".lock"
_held_locks: dict[str, list] = {}  # real path of a lock file → [open file, depth], this process
_held_guard = threading.Lock()


def _cannot_write(out: Path, exc: OSError) -> RunError:
    return RunError(f"cannot write to --out {out} ({exc.strerror or exc}); "
                    "choose a folder you can write to")


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike, create: bool = True):
    """Hold the exclusive lock of a run directory (created first when ``create``) while the
    block runs; raise ``RunDirBusy`` at once, naming the holder's pid, when another process
    holds it.

    The lock is a non-blocking ``flock`` on ``RUN_DIR/.lock``, the holder's pid written in it.
    The kernel drops it when the holder's process ends, however it ends (``kill -9`` too), so a
    lock never goes stale; the file itself stays (removing it would race with the next run).
    It is re-entrant within a process: the study runner holds a cell's lock around its
    ``train_run``, which takes it again. flock is reliable on local file systems; on NFS it
    depends on the server.
    """
    run_dir = Path(run_dir)
    if create:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _cannot_write(run_dir, exc) from exc
    path = run_dir / LOCK_FILE
    key = os.path.realpath(path)
    with _held_guard:
        held = _held_locks.get(key)
        if held is not None:
            held[1] += 1
    if held is None:
        try:
            f = open(path, "a+")
        except OSError as exc:
            raise _cannot_write(run_dir, exc) from exc
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            pid = f.read().strip() or "unknown"
            f.close()
            raise RunDirBusy(f"run directory {run_dir} is in use by another process (pid {pid}); "
                             "wait for it or choose another --out") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        held = [f, 1]
        with _held_guard:
            _held_locks[key] = held
    try:
        yield run_dir
    finally:
        with _held_guard:
            held[1] -= 1
            last = held[1] == 0
            if last:
                del _held_locks[key]
        if last:
            held[0].close()  # closing the file releases the flock


def _prepare_dir(out: Path, config: RunConfig, resume: bool, main: bool = True) -> dict | None:
    """Check the (locked) run directory; return the checkpoint to resume from, if any. Only
    the ``main`` process (rank 0) checks and writes a new run's directory."""
    if resume:
        return _load_checkpoint(out, config)
    if not main:
        return None
    if (out / "summary.json").exists():
        raise RunError(f"{out} holds a finished run (summary.json); it is kept as it is. "
                       "Choose another --out, or delete that folder yourself to run again")
    if (out / "checkpoint.pt").exists() or (out / "metrics.jsonl").exists():
        raise RunError(f"{out} holds an unfinished run; continue it with --resume, "
                       "or choose another --out")
    try:
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise _cannot_write(out, exc) from exc
    _write_json(out / "config.json", dataclasses.asdict(config))
    return None


def _load_checkpoint(out: Path, config: RunConfig) -> dict:
    path = out / "checkpoint.pt"
    if (out / "summary.json").exists():
        raise RunError(f"{out} holds a finished run (summary.json): nothing to resume")
    if not path.exists():
        raise RunError(f"--resume: no checkpoint at {path}; start a new run without --resume")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise RunError(f"--resume: checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); "
                       "it was left untouched; start a new run with another --out") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"--resume: {path} is not an exoticnorm checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise RunError(f"--resume: {path} has checkpoint version {ckpt.get('version')}, "
                       f"this exoticnorm reads version {CHECKPOINT_VERSION}")
    saved = {**dataclasses.asdict(RunConfig()), **ckpt["config"]}  # fields added since
    wanted = dataclasses.asdict(config)
    diff = {k: (saved.get(k), v) for k, v in wanted.items()
            if saved.get(k) != v and k not in RESUMABLE_CHANGES}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise RunError(f"--resume: the checkpoint in {out} was made with other settings ({lines}); "
                       "resume with the same settings, or start a new run with another --out")
    if ckpt["epoch"] >= config.epochs:
        raise RunError(f"--resume: the checkpoint already has {ckpt['epoch']} epochs; "
                       f"ask for more with --epochs")
    return ckpt


def train_run(
    config: RunConfig,
    out: str | os.PathLike,
    device: str = "auto",
    data_dir: str | None = None,
    wandb_mode: str | None = None,
    resume: bool = False,
    download: bool = True,
    echo: Callable[[str], None] = print,
    group: str | None = None,
    data: FashionMNIST | None = None,
    stop_after: int | None = None,
    name: str | None = None,
    wandb_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train, evaluating after every epoch; return the summary (also in ``out/summary.json``).

    ``stop_after`` ends the process-equivalent of a kill after that many epochs (for tests).
    ``name`` and ``wandb_config`` (merged into the logged config) name the run in wandb.
    ``wandb_mode`` None: on resume the mode the run started with (kept in the checkpoint),
    else ``$WANDB_MODE`` or the login (see tracking.py).
    A last batch of one example is dropped (a batch statistic of one value is undefined).
    A non-finite training loss ends the run with ``status: "diverged"``; the last good
    checkpoint stays. The run holds the directory's lock (``run_dir_lock``) throughout: a
    second run into it fails at once with ``RunDirBusy``.

    Inside an initialized process group of several processes every rank calls this with the
    same arguments (checked first) and trains its shard (see the module docstring); the
    batch size must split evenly over the ranks. Rank 0 returns the summary it writes, the
    others the same summary unwritten.
    """
    out = Path(out)
    world = distributed.world_size()
    # first, before any rank can fail alone: every rank must be here with the same settings
    distributed.check_same({**dataclasses.asdict(config), "resume": resume, "out": str(out)})
    if world > 1:
        distributed.check_batch_size(config.batch_size, world)
    main = distributed.rank() == 0
    echo = echo if main else (lambda text: None)
    with contextlib.ExitStack() as held:
        with distributed.all_or_none():
            dev = distributed.rank_device(pick_device(device))
            torch.manual_seed(config.seed)
            model = config.build_model()  # bad norm options fail here, before anything is written
            if resume and not out.is_dir():
                raise RunError(f"--resume: no checkpoint at {out / 'checkpoint.pt'}; start a new run without --resume")
            if main:
                held.enter_context(run_dir_lock(out, create=not resume))
            ckpt = _prepare_dir(out, config, resume, main)
            if dev.type == "cpu":
                torch.set_flush_denormal(True)  # subnormal sigmoid outputs slow CPU steps a lot
            data = data or load_fashion_mnist(data_dir, dev, download, config.limit_train, config.limit_test)
            if world > 1:
                distributed.check_last_batch(_train_size(len(data.train_x), config.batch_size),
                                             config.batch_size, world)
        distributed.check_same({"training images": len(data.train_x), "test images": len(data.test_x)})
        return _train(config, out, dev, model, ckpt, data, wandb_mode, echo, group, stop_after, name,
                      wandb_config)


def _train(config, out, dev, net, ckpt, data, wandb_mode, echo, group, stop_after, name,
           wandb_config) -> dict[str, Any]:
    main = distributed.rank() == 0
    data.train_x, data.train_y = data.train_x.to(dev), data.train_y.to(dev)
    data.test_x, data.test_y = data.test_x.to(dev), data.test_y.to(dev)

    net = net.to(dev)
    optimizer = _optimizer(config, net.parameters())
    start_epoch, elapsed, run_id = 0, 0.0, None
    metrics_path = out / "metrics.jsonl"
    if ckpt is not None:
        try:
            net.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise RunError(f"--resume: the checkpoint in {out} does not fit this model ({exc})") from exc
        torch.set_rng_state(ckpt["rng_cpu"])
        if dev.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], dev)
        start_epoch, elapsed, run_id = ckpt["epoch"], ckpt["elapsed"], ckpt.get("wandb_run_id") or None
        if wandb_mode is None and ckpt.get("wandb_mode"):  # keep the run's mode unless told otherwise
            wandb_mode = ckpt["wandb_mode"]
        if main:
            lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
            kept = [l for l in lines if _epoch_of(l) is not None and _epoch_of(l) <= start_epoch]
            if any(key not in json.loads(l) for l in kept for key in EVAL_KEYS):
                raise RunError(f"--resume: {out} was evaluated under the old per-norm eval protocol "
                               f"(its metrics.jsonl lacks {', '.join(EVAL_KEYS[:4])}); a resumed run would "
                               "mix protocols. Start it again with another --out (this run is kept as it is)")
            _atomic_write(metrics_path, lambda p: p.write_text("".join(l + "\n" for l in kept)))
        echo(f"resuming {out} after epoch {start_epoch}")
    model = distributed.wrap(net, dev)  # what trains: DDP over the ranks, else the net itself

    name = name or f"{config.norm}-s{config.seed}"
    world = distributed.world_size()
    logged = {**dataclasses.asdict(config), "device": str(dev), "processes": world, **(wandb_config or {})}
    tracker = WandbLogger(wandb_mode if main else "disabled", out, logged, name=name, group=group,
                          run_id=run_id, echo=echo)
    n_params = sum(p.numel() for p in net.parameters())
    n_data = len(data.train_x)
    n_train = _train_size(n_data, config.batch_size)
    steps = math.ceil(n_train / config.batch_size)
    stats = ActivationRecorder(net.norms(), steps, device=dev)
    stats.restore(out / "activations.pt", start_epoch)
    on = f"device {dev}" if world == 1 else f"{world} processes on {dev.type}"
    echo(f"{name}: {n_params} parameters, {n_train} training "
         f"images from {data.source}, {on}, {config.epochs} epochs")
    echo(f"{'epoch':>5} {'loss':>7} {'train':>6} {'t_loss':>7} {'t_run':>6} {'t_prec':>6} {'img/s':>8} {'sec':>6}  norm output mean/std")
    status, record = "finished", {}
    for epoch in range(start_epoch + 1, config.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        distributed.reseed(config.seed, epoch)
        gen = torch.Generator(device=dev).manual_seed(config.seed * 1_000_003 + epoch)
        order = torch.randperm(n_data, device=dev, generator=gen)[:n_train]
        loss_sum, correct = _train_epoch(model, optimizer, data, order, config.batch_size, stats,
                                         f"epoch {epoch}")
        train_loss = loss_sum / n_train
        train_time = time.perf_counter() - t0
        if not math.isfinite(train_loss):
            status = "diverged"
            echo(f"training diverged in epoch {epoch} (train loss {train_loss}); the checkpoint "
                 f"of epoch {epoch - 1} is kept for inspection; start again with a smaller --lr "
                 "and another --out")
            break
        batches = min(config.precise_stats, steps)
        rows = [distributed.shard(order[i * config.batch_size : (i + 1) * config.batch_size])
                for i in range(batches)]
        stats.paused = True
        evals = evaluate_both(net, (data.train_x[r] for r in rows), data.test_x, data.test_y)
        stats.paused = False
        wall = time.perf_counter() - t0
        elapsed += wall
        record = {
            "epoch": epoch, "train_loss": train_loss, "train_acc": correct / n_train,
            **evals, "images_per_sec": n_train / train_time,
            "epoch_time": wall, "elapsed": elapsed, **stats.end_epoch(),
        }
        if main:
            _atomic_write(out / "activations.pt", stats.save)
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            checkpoint = {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch,
                "config": dataclasses.asdict(config), "model": net.state_dict(),
                "optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                "elapsed": elapsed, "wandb_run_id": tracker.run_id or "", "wandb_mode": tracker.mode,
            }
            _atomic_write(out / "checkpoint.pt", lambda p: torch.save(checkpoint, p))
        tracker.log(record, step=epoch)
        tracker.log_activations(stats.state(), epoch)
        acts = " ".join(f"{record[f'act/{s}/mean']:+.2f}/{record[f'act/{s}/std']:.2f}"
                        for s in net.norm_sites if f"act/{s}/mean" in record)
        echo(f"{epoch:>5} {train_loss:7.4f} {record['train_acc']:6.3f} {record['test_loss']:7.4f} "
             f"{record['test_acc_running']:6.3f} {record['test_acc_precise']:6.3f} {record['images_per_sec']:8.0f} {wall:6.1f}  {acts}")
        if stop_after is not None and epoch >= stop_after:
            tracker.finish()
            return {"status": "stopped", "epoch": epoch}

    summary = {
        "status": status,
        "epochs_done": record.get("epoch", start_epoch),
        **{k: record.get(k) for k in ("test_acc", "train_acc", "train_loss", "test_loss", *EVAL_KEYS)},
        "images_per_sec": record.get("images_per_sec"), "elapsed": elapsed,
        "device": str(dev), "data_source": data.source, "parameters": n_params,
        "torch": torch.__version__, "processes": world, "config": dataclasses.asdict(config),
    }
    if main:
        _write_json(out / "summary.json", summary)
    tracker.finish({k: v for k, v in summary.items() if k != "config"})
    echo(f"{status}: test_acc {summary['test_acc']}, summary in {out / 'summary.json'}")
    return summary
