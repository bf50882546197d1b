"""Per-batch activation statistics of each norm's output (fastai's "plot the activations").

Every training step records, per norm site, the mean and std of the norm's output; every
``hist_every`` steps also a histogram of it over fixed bins (two open tails beyond ±4, which
for a sigmoid net count the saturated outputs: σ(±3) ≈ 0.95/0.05). Values stay on the device
and are synced over the ranks once per epoch; the run's history is saved as ``activations.pt``:

    {"sites": [S names], "steps_per_epoch": int,
     "mean", "std": FloatTensor[T, S]            # one row per training step, all epochs in order
     "hist_every": int, "hist_step": LongTensor[H],  # global step of each histogram row
     "hist": FloatTensor[H, S, B],               # fraction of outputs per bin (rows sum to 1)
     "hist_edges": FloatTensor[B + 1]}           # edges[0] = -inf, edges[-1] = +inf
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from . import distributed

__all__ = ["ActivationRecorder", "HIST_EDGES", "load_activations"]

#: 16 bins of width 0.5 on [-4, 4] and the two tails
HIST_EDGES = torch.cat([torch.tensor([-torch.inf]), torch.linspace(-4, 4, 17), torch.tensor([torch.inf])])


class ActivationRecorder:
    """Forward hooks on ``norms`` (site → module) recording their training outputs per step.

    Set ``step`` before each training forward; ``paused`` stops recording (precise-statistics
    passes run the norms in training mode too).
    """

    def __init__(self, norms: dict[str, nn.Module], steps_per_epoch: int, hist_every: int = 10,
                 device: torch.device | str = "cpu") -> None:
        self.sites = list(norms)
        self.steps_per_epoch, self.hist_every, self.device = steps_per_epoch, hist_every, torch.device(device)
        self.step, self.paused = 0, False
        self._inner = HIST_EDGES[1:-1].to(self.device)
        self._epoch = self._fresh()
        self.history: dict[str, Tensor] = {
            "mean": torch.zeros(0, len(self.sites)), "std": torch.zeros(0, len(self.sites)),
            "hist_step": torch.zeros(0, dtype=torch.long),
            "hist": torch.zeros(0, len(self.sites), len(HIST_EDGES) - 1),
        }
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(norms.values())]

    def _fresh(self) -> dict[str, Tensor]:
        """An epoch's buffers on the device, allocated up front: every rank syncs the same shapes."""
        s, n, kw = len(self.sites), self.steps_per_epoch, {"device": self.device}
        return {"mean": torch.zeros(n, s, **kw), "std": torch.zeros(n, s, **kw),
                "hist": torch.zeros(-(-n // self.hist_every), s, len(HIST_EDGES) - 1, **kw)}

    def _hook(self, i: int):
        def hook(module, inputs, output):
            if not module.training or self.paused or not torch.is_tensor(output):
                return
            with torch.no_grad():
                y = output.detach().float()
                buf = self._epoch
                std, mean = torch.std_mean(y)
                buf["mean"][self.step, i], buf["std"][self.step, i] = mean, std
                if self.step % self.hist_every == 0:
                    counts = torch.bincount(torch.bucketize(y.flatten(), self._inner),
                                            minlength=len(HIST_EDGES) - 1)
                    buf["hist"][self.step // self.hist_every, i] = counts.float() / y.numel()
        return hook

    def end_epoch(self) -> dict[str, float]:
        """Append the epoch (averaged over the ranks) to ``history``; return its per-site means
        of the per-step mean and std (``act/SITE/mean``, ``act/SITE/std``)."""
        if not self.sites:
            return {}
        world = distributed.world_size()
        buf = {k: (distributed.all_sum(v) / world).cpu() for k, v in self._epoch.items()}
        self._epoch = self._fresh()
        offset = len(self.history["mean"])
        hist_step = offset + torch.arange(0, self.steps_per_epoch, self.hist_every)
        h = self.history
        h["mean"], h["std"] = torch.cat([h["mean"], buf["mean"]]), torch.cat([h["std"], buf["std"]])
        h["hist_step"], h["hist"] = torch.cat([h["hist_step"], hist_step]), torch.cat([h["hist"], buf["hist"]])
        out = {}
        for i, site in enumerate(self.sites):
            out[f"act/{site}/mean"] = buf["mean"][:, i].mean().item()
            out[f"act/{site}/std"] = buf["std"][:, i].mean().item()
        return out

    def state(self) -> dict:
        return {"sites": self.sites, "steps_per_epoch": self.steps_per_epoch,
                "hist_every": self.hist_every, "hist_edges": HIST_EDGES, **self.history}

    def save(self, path: Path) -> None:
        torch.save(self.state(), path)

    def restore(self, path: Path, epochs: int) -> None:
        """Take the first ``epochs`` epochs of a saved history (resuming a run); rows it lacks,
        or all ``epochs`` of them when the file is missing or from another model, are NaN."""
        t = epochs * self.steps_per_epoch
        saved = load_activations(path) if path.is_file() else None
        if saved is None or saved["sites"] != self.sites or saved["steps_per_epoch"] != self.steps_per_epoch:
            saved = {k: v[:0] for k, v in self.history.items()}
        keep = saved["hist_step"] < t
        gap = torch.full((max(0, t - len(saved["mean"])), len(self.sites)), torch.nan)  # lost rows
        self.history = {"mean": torch.cat([saved["mean"][:t], gap]), "std": torch.cat([saved["std"][:t], gap]),
                        "hist_step": saved["hist_step"][keep], "hist": saved["hist"][keep]}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def load_activations(path: str | Path) -> dict:
    """A run's ``activations.pt``."""
    return torch.load(path, weights_only=True)
