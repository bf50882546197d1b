"""Study definitions: a TOML file = a question + a grid of LeNet runs × seeds.

```toml
question = "Does the bias before BN matter?"   # written at the top of the report
seeds = 3                                      # seeds 0..seeds-1
[analysis]                                     # how `exoticnorm report` answers (analysis.py)
kind = "compare"
protocol = "precise"                           # the test accuracy it uses: precise or running
[base]                                         # RunConfig fields shared by every cell
epochs = 10
[grid]                                         # axes; the cells are their cartesian product
norm = ["bn", "none"]                          # scalar values: the axis is a RunConfig field
bias = [{label = "bias", bias = true},         # tables: several fields at once, named by label
        {label = "no-bias", bias = false}]
[quick]                                        # --quick: overrides of seeds, base and grid axes
seeds = 1
base = {epochs = 1, limit_train = 2000}
```

A cell's runs live in ``OUT/<label>_<label>…-s<seed>``; its labels also go to wandb
(group = study name).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .analysis import KINDS
from .points import ACC_KEYS, DEFAULT_PROTOCOL, PROTOCOLS
from .train import RunConfig, RunError, check_setting

__all__ = ["StudyError", "Cell", "Study", "load_study", "parse_shard"]

FIELDS = {f.name for f in dataclasses.fields(RunConfig)} - {"seed"}
TOP_KEYS = {"name", "question", "notes", "seeds", "analysis", "base", "grid", "quick"}
QUICK_KEYS = {"seeds", "base", "grid"}
_SAFE = re.compile(r"^[A-Za-z0-9.+=-]+$")


class StudyError(ValueError):
    """A study file that cannot be run; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class Cell:
    """One grid point at one seed."""

    labels: tuple[tuple[str, str], ...]  # (axis, label) in grid order
    config: RunConfig

    @property
    def key(self) -> str:
        """The grid point, without the seed: ``bn_lr-0.1``."""
        return "_".join(label for _, label in self.labels) or "base"

    @property
    def run_name(self) -> str:
        return f"{self.key}-s{self.config.seed}"


@dataclass
class Study:
    name: str
    path: Path
    question: str
    seeds: list[int]
    analysis: dict[str, Any]
    axes: dict[str, list[tuple[str, dict[str, Any]]]]  # axis → [(label, fields)]
    base: dict[str, Any]
    quick: bool = False
    notes: str = ""  # how to read the results (no numbers: those come from the runs)
    cells: list[Cell] = field(default_factory=list)

    @property
    def run_dir_name(self) -> str:
        return self.name + ("-quick" if self.quick else "")

    def points(self) -> list[str]:
        """Cell keys in grid order (one per grid point)."""
        seen: dict[str, None] = {}
        for c in self.cells:
            seen.setdefault(c.key)
        return list(seen)

    def sweep_config(self, seeds_given: bool = False) -> dict[str, Any]:
        """A wandb sweep (method grid) over the same cells; each agent call runs
        ``exoticnorm run-cell STUDY --axis=label ... --seed=S`` (see cli.py)."""
        params = {axis: {"values": [label for label, _ in values]} for axis, values in self.axes.items()}
        params["seed"] = {"values": list(self.seeds)}
        command = ["${env}", "exoticnorm", "run-cell", str(self.path)]
        if self.quick:
            command.append("--quick")
        if seeds_given:
            command.append(f"--seeds={len(self.seeds)}")
        return {
            "name": self.run_dir_name, "program": "exoticnorm", "method": "grid",
            "metric": {"name": ACC_KEYS[self.analysis.get("protocol", DEFAULT_PROTOCOL)], "goal": "maximize"},
            "parameters": params, "command": command + ["${args}"],
        }

    def find_cell(self, labels: dict[str, str], seed: int) -> Cell:
        for cell in self.cells:
            if dict(cell.labels) == labels and cell.config.seed == seed:
                return cell
        valid = {axis: [label for label, _ in values] for axis, values in self.axes.items()}
        raise StudyError(f"{self.path}: no cell {labels} with seed {seed}; the axes are {valid} "
                         f"and the seeds {self.seeds}")


def _fail(path: Path, msg: str) -> StudyError:
    return StudyError(f"{path}: {msg}")


def _check_fields(path: Path, where: str, fields: dict[str, Any]) -> None:
    """Known settings only, each with the type and range of its CLI option (train.check_setting)."""
    if not isinstance(fields, dict):
        raise _fail(path, f"{where} must be a table of settings, got {fields!r}")
    bad = sorted(set(fields) - FIELDS)
    if bad:
        raise _fail(path, f"{where}: unknown setting(s) {', '.join(bad)}; valid are "
                          f"{', '.join(sorted(FIELDS))} (the seed comes from `seeds`)")
    for name, value in fields.items():
        try:
            check_setting(name, value)
        except RunError as exc:
            raise _fail(path, f"{where} {exc}") from exc


def _axis(path: Path, name: str, values: Any) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(values, list) or not values:
        raise _fail(path, f"grid.{name} must be a non-empty list of values")
    out = []
    for v in values:
        if isinstance(v, dict):
            v = dict(v)
            label = v.pop("label", None)
            if label is None:
                raise _fail(path, f"grid.{name}: a table value needs a label, got {v}")
            _check_fields(path, f"grid.{name} ({label})", v)
            fields = v
        else:
            if name not in FIELDS:
                raise _fail(path, f"grid.{name}: plain values need the axis to be a setting "
                                  f"({', '.join(sorted(FIELDS))}); use tables with a label otherwise")
            label = str(v) if name == "norm" else f"{name}-{v}"
            fields = {name: v}
            _check_fields(path, f"grid.{name} ({label})", fields)
        label = str(label)
        if not _SAFE.match(label):
            raise _fail(path, f"grid.{name}: label {label!r} may only hold letters, digits and . + = -")
        out.append((label, fields))
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise _fail(path, f"grid.{name}: labels repeat ({labels})")
    return out


def _check_analysis(path: Path, analysis: dict[str, Any], axes: dict) -> None:
    """Fail at load time, not after the runs, on an [analysis] the report cannot use."""
    kind = analysis.get("kind", "compare")
    if kind not in KINDS:
        raise _fail(path, f"analysis.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    for key in KINDS[kind].needs:
        if key not in analysis:
            raise _fail(path, f"analysis.kind = {kind!r} needs analysis.{key} (a setting, e.g. \"lr\")")
    protocol = analysis.get("protocol", DEFAULT_PROTOCOL)
    if protocol not in PROTOCOLS:
        raise _fail(path, f"analysis.protocol must be one of {', '.join(PROTOCOLS)} (the test accuracy "
                          f"the report uses), got {protocol!r}")
    if "x" in analysis and analysis["x"] not in FIELDS:
        raise _fail(path, f"analysis.x must be a setting ({', '.join(sorted(FIELDS))}), got {analysis['x']!r}")
    for key in ("facet",):
        if key in analysis and analysis[key] not in axes:
            raise _fail(path, f"analysis.{key} must be a grid axis ({', '.join(axes)}), got {analysis[key]!r}")
    for axis in analysis.get("focus", {}):
        if axis not in axes:
            raise _fail(path, f"analysis.focus names {axis!r}, not a grid axis ({', '.join(axes)})")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (1 ≤ i ≤ n) → (i, n)."""
    if text is None:
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise StudyError(f"--shard expects i/n with 1 <= i <= n (e.g. 1/3), got {text!r}")
    return int(m[1]), int(m[2])


def load_study(path: str | Path, quick: bool = False, seeds: int | None = None) -> Study:
    """Read and check a study file; every cell's config and model are built once here, so a
    bad norm option fails before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"{path}: no such study file; the studies are in studies/*.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise _fail(path, f"not valid TOML ({exc})") from exc
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise _fail(path, f"unknown top-level key(s) {', '.join(unknown)}; use {', '.join(sorted(TOP_KEYS))}")
    if "question" not in raw:
        raise _fail(path, "write the study's question at the top: question = \"...\"")
    quick_raw = raw.get("quick", {})
    if set(quick_raw) - QUICK_KEYS:
        raise _fail(path, f"[quick] may only override {', '.join(sorted(QUICK_KEYS))}")
    base = dict(raw.get("base", {}))
    grid = dict(raw.get("grid", {}))
    n_seeds = raw.get("seeds", 1)
    for axis in quick_raw.get("grid", {}):
        if axis not in grid:
            raise _fail(path, f"quick.grid.{axis} is not an axis of [grid]")
    _check_fields(path, "[quick] base", quick_raw.get("base", {}))
    for where, value in (("seeds", n_seeds), ("quick.seeds", quick_raw.get("seeds", 1))):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _fail(path, f"{where} must be a positive integer, got {value!r}")
    if quick:
        base.update(quick_raw.get("base", {}))
        grid.update(quick_raw.get("grid", {}))
        n_seeds = quick_raw.get("seeds", n_seeds)
    if seeds is not None:
        n_seeds = seeds
    if not isinstance(n_seeds, int) or isinstance(n_seeds, bool) or n_seeds < 1:
        raise _fail(path, f"seeds must be a positive integer, got {n_seeds!r}")
    _check_fields(path, "[base]", base)
    axes = {name: _axis(path, name, values) for name, values in grid.items()}
    study = Study(name=raw.get("name", path.stem), path=path, question=raw["question"].strip(),
                  seeds=list(range(n_seeds)), analysis=dict(raw.get("analysis", {})),
                  axes=axes, base=base, quick=quick, notes=raw.get("notes", "").strip())
    points = list(itertools.product(*axes.values())) if axes else [()]
    _check_analysis(path, study.analysis, axes)
    for seed in study.seeds:  # seed-major: every grid point gets a first seed early
        for point in points:
            fields, by_axes = dict(base), set()
            for (axis, _), (label, values) in zip(axes.items(), point):
                clash = set(values) & by_axes
                by_axes |= set(values)
                if clash:
                    raise _fail(path, f"grid.{axis} ({label}) sets {', '.join(sorted(clash))}, "
                                      "which another axis also sets")
                fields.update(values)
            try:
                config = RunConfig(**fields, seed=seed)
                if seed == study.seeds[0]:
                    config.build_model()
            except (RunError, ValueError, TypeError) as exc:
                where = "_".join(label for label, _ in point) or "base"
                raise _fail(path, f"cell {where}: {exc}") from exc
            labels = tuple((axis, label) for axis, (label, _) in zip(axes, point))
            study.cells.append(Cell(labels, config))
    ref = study.analysis.get("reference")
    if isinstance(ref, dict):  # {axis = label}: each cell against its twin with that label
        axis, label = next(iter(ref.items())) if len(ref) == 1 else (None, None)
        if axis not in axes or label not in [lab for lab, _ in axes[axis]]:
            raise _fail(path, f"analysis.reference as a table names one grid axis and one of its labels "
                              f"(e.g. {{ {next(iter(axes))} = \"{axes[next(iter(axes))][0][0]}\" }}), got {ref!r}")
    elif ref is not None:
        facet = study.analysis.get("facet")
        by_facet = facet and KINDS[study.analysis.get("kind", "compare")].reference_is == "facet"
        valid = [label for label, _ in axes[facet]] if by_facet else study.points()
        if ref not in valid:
            raise _fail(path, f"analysis.reference {ref!r} is not one of {', '.join(valid)}")
    return study


def config_dict(config: RunConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))
