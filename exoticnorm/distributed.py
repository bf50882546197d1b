"""One run over several processes (torchrun): the process group, ranks and batch shards,
start-up agreement between ranks, and the synced batch statistics of the norms.

``exoticnorm study`` joins the process group that torchrun describes in the environment
(``session``); ``train_run`` trains with DistributedDataParallel whenever more than one
process takes part. In one process every helper here is a no-op or returns its input.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import functional as EF

__all__ = ["DistributedError", "synced", "rank", "world_size", "session", "rank_device",
           "launch", "check_batch_size", "check_last_batch", "check_same", "all_or_none",
           "shard", "wrap", "all_sum", "from_main", "reseed", "synced_moments"]


class DistributedError(ValueError):
    """A run over several processes that cannot go on as asked; the message says what to change."""


def synced(group: Any = None) -> bool:
    """True inside an initialized process group (``group``, default: all processes) of 2 or more."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank() -> int:
    return dist.get_rank() if synced() else 0


def world_size() -> int:
    return dist.get_world_size() if synced() else 1


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[None]:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...) for the block, nccl on CUDA and gloo on the CPU, and leave it after.
    Nothing happens outside torchrun, in a world of one or when a group is already initialized."""
    if _env_int("WORLD_SIZE", 1) <= 1 or dist.is_initialized():
        yield
        return
    device = rank_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    finished = False
    try:
        yield
        finished = True
    finally:
        if finished:
            dist.barrier()  # no rank leaves while another still talks
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """This process's device: with CUDA in a run of several processes, GPU LOCAL_RANK of its
    node (one GPU per process); else ``device``."""
    world = max(world_size(), _env_int("WORLD_SIZE", 1))
    if device.type != "cuda" or world <= 1:
        return device
    per_node = _env_int("LOCAL_WORLD_SIZE", world)
    if device.index is not None:
        if per_node > 1:
            raise DistributedError(f"--device {device} names one GPU for {per_node} processes on this "
                                   "node; use --device cuda: process i uses GPU i")
        return device
    local, gpus = _env_int("LOCAL_RANK", rank()), torch.cuda.device_count()
    if local >= gpus:
        raise DistributedError(f"{per_node} processes on this node but {gpus} GPU(s): start at most "
                               f"{gpus} processes per node, or train on the CPU with --device cpu")
    return torch.device("cuda", local)


def launch(nproc: int, args: list[str]) -> int:
    """Run ``exoticnorm study ARGS`` as ``nproc`` processes on this machine through torchrun
    (``torch.distributed.run --standalone``: a rendezvous on a free local port); its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "exoticnorm", "study", *args]
    return subprocess.run(command, check=False).returncode


def check_batch_size(batch_size: int, world: int) -> None:
    """Refuse a global batch that does not split into equal shards of at least 2 images (a batch
    statistic needs 2), naming batch sizes and process counts that would."""
    if batch_size % world == 0 and batch_size // world >= 2:
        return
    lower = batch_size // world * world
    sizes = [b for b in (lower, lower + world, lower + 2 * world) if b >= 2 * world and b != batch_size]
    counts = [n for n in range(2, batch_size // 2 + 1) if batch_size % n == 0]
    raise DistributedError(
        f"--batch-size {batch_size} does not split over {world} processes into equal shards of at "
        f"least 2 images: use a multiple of {world} (e.g. {' or '.join(map(str, sizes[:2]))}), or a "
        f"process count that divides it ({', '.join(map(str, counts)) if counts else 'none: one process'})")


def check_last_batch(n_train: int, batch_size: int, world: int) -> None:
    """Refuse an epoch whose last (partial) batch gives some process fewer than 2 images."""
    last = n_train - (math.ceil(n_train / batch_size) - 1) * batch_size
    if last >= 2 * world:
        return
    whole = n_train - last
    fix = f"--limit-train {whole} (whole batches only)" if whole >= 2 else "more training images"
    raise DistributedError(
        f"the last batch of each epoch holds {last} of the {n_train} training images, fewer than 2 "
        f"per process for {world} processes; use {fix} or another --batch-size")


def _gather(obj: Any) -> list[Any]:
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def check_same(settings: dict[str, Any]) -> None:
    """Refuse to start when the ranks were given different settings: every rank gathers every
    rank's ``settings`` (a flat table) and raises the same error naming what differs from rank 0."""
    if world_size() == 1:
        return
    tables = [json.loads(t) for t in _gather(json.dumps(settings, sort_keys=True, default=str))]
    lines = [f"{key}: rank 0 {tables[0].get(key)!r}, rank {r} {table.get(key)!r}"
             for r, table in enumerate(tables[1:], 1)
             for key in sorted(tables[0].keys() | table.keys()) if tables[0].get(key) != table.get(key)]
    if lines:
        raise DistributedError("the processes of this run were started with different settings ("
                               + "; ".join(lines) + "); start every rank with the same arguments")


@contextlib.contextmanager
def all_or_none() -> Iterator[None]:
    """Run the block on every rank; when it raises on any, raise on all (the exception itself
    where it happened, a DistributedError naming that rank elsewhere), so that no rank waits in
    a collective for one that has failed. Plain in one process."""
    error = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
        error = exc
    if world_size() > 1:
        failed = [(r, m) for r, m in enumerate(_gather(None if error is None else str(error))) if m]
        if error is None and failed:
            raise DistributedError(f"rank {failed[0][0]} could not start: {failed[0][1]}")
    if error is not None:
        raise error


def shard(rows: Tensor) -> Tensor:
    """This rank's contiguous part of a global batch (sizes differ by at most one, in rank
    order, so that the parts joined are the batch); the whole batch in one process."""
    world = world_size()
    return rows if world == 1 else rows.tensor_split(world)[rank()]


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel (gradients averaged over the ranks) when several
    processes take part; ``model`` itself in one process."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def all_sum(t: Tensor) -> Tensor:
    """``t`` summed over the ranks, in place; ``t`` unchanged in one process."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (such as a run directory named after the clock)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reseed(seed: int, epoch: int) -> None:
    """With several processes, seed torch's generator (dropout) per rank and epoch: the ranks draw
    different masks and a resumed run draws the same ones again. One process keeps its stream
    (checkpointed with the run)."""
    if world_size() > 1:
        torch.manual_seed((seed * 1_000_003 + epoch) * 4_099 + rank())


class _SumOverRanks(torch.autograd.Function):
    """A tensor summed over the processes of a group; its gradient too (every rank's loss
    depends on every rank's input)."""

    @staticmethod
    def forward(ctx, t: Tensor, group: Any) -> Tensor:
        ctx.group = group
        t = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _SumOverRanks.apply(grad, ctx.group), None


def synced_moments(x: Tensor, shift: Tensor, group: Any = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean, biased variance and value count of ``x`` (N, C, *) over every dim but C
    and every process of ``group``, differentiable: one all_reduce of [Σ(x − s), Σ(x − s)², n],
    whose backward sums the gradients over the processes (torch.nn.SyncBatchNorm's math).
    ``shift`` s (C,) must be equal on all ranks (the running mean): the sums then merge exactly,
    and the variance loses little to cancellation when s is near the mean."""
    c, shift = x.shape[1], shift.detach().to(x.dtype)
    xs = x - EF.per_channel(shift, x.ndim)
    dims = EF.channel_dims(x)
    n = x.new_full((1,), float(EF.values_per_channel(x)))
    sums = _SumOverRanks.apply(torch.cat([xs.sum(dims), xs.square().sum(dims), n]), group)
    count = sums[-1]
    mean = sums[:c] / count
    var = (sums[c : 2 * c] / count - mean.square()).clamp_min(0.0)
    return shift + mean, var, count
