"""Tables from finished runs: seeds grouped by everything else in the config, mean ± std."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Iterable

__all__ = ["load_summaries", "group_by_config", "markdown_table"]

METRICS = ("test_acc", "train_acc", "train_loss", "images_per_sec")


def load_summaries(run_dirs: Iterable[str | Path]) -> list[dict]:
    """``summary.json`` of every finished run among ``run_dirs`` (others are skipped)."""
    found = []
    for d in map(Path, run_dirs):
        path = d / "summary.json"
        if path.is_file():
            found.append({**json.loads(path.read_text()), "run_dir": str(d)})
    return found


def _label(config: dict) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in sorted(config.get("norm_opts", {}).items()))
    return f"{config['norm']}" + (f" ({opts})" if opts else "")


def group_by_config(summaries: list[dict]) -> dict[str, list[dict]]:
    """Runs whose configs differ only in the seed, under one label (the norm and its options,
    plus any other setting that differs between groups)."""
    groups: dict[str, list[dict]] = {}
    keyed: dict[str, dict] = {}
    from .train import StudyConfig

    defaults = dataclasses.asdict(StudyConfig())  # runs made before a field existed
    for s in summaries:
        config = {k: v for k, v in {**defaults, **s["config"]}.items() if k != "seed"}
        key = json.dumps(config, sort_keys=True)
        keyed[key] = config
        groups.setdefault(key, []).append(s)
    varying = {k for c in keyed.values() for k in c
               if len({json.dumps(o.get(k), sort_keys=True) for o in keyed.values()}) > 1}
    varying -= {"norm", "norm_opts"}
    named = {}
    for key, runs in groups.items():
        extra = ", ".join(f"{k}={keyed[key][k]}" for k in sorted(varying))
        named[_label(keyed[key]) + (f" [{extra}]" if extra else "")] = runs
    return named


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def markdown_table(summaries: list[dict]) -> str:
    """One row per config: n seeds and mean ± sample std of the final metrics."""
    lines = ["| norm | n | test acc | train acc | train loss | images/s | diverged |",
             "|---|---|---|---|---|---|---|"]
    for label, runs in sorted(group_by_config(summaries).items()):
        ok = [r for r in runs if r["status"] == "finished"]
        cells = [_mean_std([r[m] for r in ok]) if ok else "–" for m in METRICS[:3]]
        ips = f"{statistics.mean(r['images_per_sec'] for r in ok):,.0f}" if ok else "–"
        lines.append(f"| {label} | {len(ok)} | {' | '.join(cells)} | {ips} | {len(runs) - len(ok)} |")
    return "\n".join(lines) + "\n"
