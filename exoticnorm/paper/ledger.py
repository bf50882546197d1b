"""The provenance ledger: every number the paper prints, with the source it was computed from."""

from __future__ import annotations

import importlib
import inspect
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .sources import StudyData, rel

#: what counts as a number in the paper: percentages and numbers with a decimal point
#: (optionally signed, optionally with an exponent); integers are not scanned.
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?%|(?<![\w.])[-+−]?\d+(?:\.\d+(?:e[-+]?\d+)?|e[-+]?\d+)")


def lookup(doc: Any, key: str) -> Any:
    for part in key.split("."):
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def series(doc: Any, cell: str | None, key: str, minus: str | None = None) -> Any:
    """``key`` of the cell (of ``doc`` itself when cell is None); with ``minus``, elementwise
    ``key − minus`` (e.g. train_acc − test_acc per seed)."""
    entry = doc if cell is None else next(c for c in doc if c["cell"] == cell)
    value = lookup(entry, key)
    return value if minus is None else [a - b for a, b in zip(value, lookup(entry, minus), strict=True)]


def compute(doc: Any, cell: str | None, key: str, op: str, minus: str | None = None,
            over: str | None = None, vs: str | None = None) -> Any:
    """The value of ``key`` in ``doc`` (a results.json list, or a dict when cell is None)
    after ``op``; cell ``*``: the key of every cell, as a list. ``ratio``: key / ``over``;
    ``welch.PART``: PART (delta, ci_low, ci_high, p) of Welch's test of the cell against cell
    ``vs`` (stats.welch at its default level)."""
    if cell == "*":
        value = [lookup(c, key) for c in doc]
    elif op == "runs":  # the planned seeds of a cell: finished + diverged + not run
        entry = next(c for c in doc if c["cell"] == cell)
        return entry["n"] + entry["diverged"] + entry["missing"]
    elif op == "ratio":
        return series(doc, cell, key) / series(doc, cell, over)
    elif op.startswith("welch."):
        from ..stats import welch

        return welch(series(doc, cell, key, minus), series(doc, vs, key, minus)).as_dict()[op[6:]]
    else:
        value = series(doc, cell, key, minus)
    ops = {"value": lambda v: v, "mean": statistics.mean, "std": statistics.stdev, "len": len,
           "sum": sum, "min": min, "max": max}
    return ops[op](value)


_HOW = {"value": "{key} of {cells}", "mean": "mean of {key} of {cells}", "std": "sample std of {key} of {cells}",
        "len": "length of {key}", "sum": "sum of {key} over {cells}", "min": "minimum of {key} over {cells}",
        "max": "maximum of {key} over {cells}", "runs": "planned runs of {cells}: n + diverged + missing",
        "ratio": "{key} / {over}", "welch.delta": "Welch's Δ of {key} against cell {vs}",
        "welch.ci_low": "Welch's CI low of {key} against cell {vs}",
        "welch.ci_high": "Welch's CI high of {key} against cell {vs}", "welch.p": "Welch's p of {key} against cell {vs}"}


def _fmt(value: Any, spec: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        raise ValueError("nan is not a number to print")
    return format(value, spec)


@dataclass
class Ledger:
    """Every number of the paper, as printed → where it came from (one entry per use).

    No number is typed by hand: ``num`` (a value of a study's results.json or .toml), ``define``
    (a constant of the text, tied to a code default), ``quote`` (numbers in text quoted from a
    file), ``cite`` (a claim of literature.toml) and ``verbatim`` (a code span copied from a
    file) each return the text to print and record its source."""

    root: Path
    numbers: dict[str, list[dict]] = field(default_factory=dict)
    verbatims: list[dict] = field(default_factory=list)

    def _add(self, text: str, source: dict) -> str:
        self.numbers.setdefault(text, []).append(source)
        return text

    def num(self, study: StudyData, cell: str | None, key: str, op: str = "value",
            fmt: str = ".4f", how: str = "", **more: str) -> str:
        """A number of the study's results.json (cell given) or study file (cell None; a
        diagnosis, which has no study file: its results.json). ``more``: ``minus``, ``over``,
        ``vs`` of ``compute``, recorded with the source."""
        diag = study.toml_path is None
        doc, path = (study.cells, study.results_path) if cell is not None or diag else (study.spec, study.toml_path)
        text = _fmt(compute(doc, cell, key, op, **more), fmt)
        where = "every cell" if cell == "*" else "the cell"
        key_text = f"{key} − {more['minus']} per seed" if "minus" in more else key
        return self._add(text, {"kind": "data", "file": rel(path, self.root), "study": study.name,
                                "cell": cell, "key": key, "op": op, **more, "format": fmt,
                                "how": how or _HOW[op].format(key=key_text, cells=where, **more)})

    def define(self, text: str, meaning: str, code: str | None = None, scale: float = 1.0,
               fmt: str = "g", suffix: str = "") -> str:
        """A constant of the text; with ``code`` (``module:function.parameter``) its value is
        that default × scale, printed with fmt and suffix, and checked here."""
        if code is not None:
            value = _code_default(code) * scale
            if _fmt(value, fmt) + suffix != text:
                raise ValueError(f"definition {text!r} is {_fmt(value, fmt) + suffix!r} in {code}")
        return self._add(text, {"kind": "definition", "meaning": meaning,
                                **({"code": code, "scale": scale, "format": fmt, "suffix": suffix}
                                   if code else {})})

    def quote(self, text: str, path: Path, key: str) -> str:
        """Text quoted from a file (``key``: a dotted key of a .toml); its numbers are recorded."""
        for m in NUMBER.finditer(text):
            self._add(m.group(), {"kind": "quote", "file": rel(path, self.root), "key": key})
        return text

    def cite(self, claim: dict, path: Path) -> str:
        """A claim of literature.toml, its numbers filled in; each is recorded."""
        stray = NUMBER.findall(re.sub(r"\{\d+\}", "", claim["text"]))
        if stray:
            raise ValueError(f"literature claim {claim['id']}: number(s) {stray} typed into its text; "
                             "put them in its numbers")
        nums = []
        for n in claim["numbers"]:
            if n not in claim["quote"]:
                raise ValueError(f"literature claim {claim['id']}: {n} is not in its quote")
            nums.append(self._add(n, {"kind": "literature", "file": rel(path, self.root),
                                      "claim": claim["id"], "cite": claim["cite"]}))
        return claim["text"].format(*nums)

    def verbatim(self, text: str, path: Path) -> str:
        """A code span copied from a file (its numbers are not scanned, the copy is checked)."""
        self.verbatims.append({"text": text, "file": rel(path, self.root)})
        return f"`{text}`"

    def as_json(self, out: Path) -> dict:
        return {"root": rel(self.root, out.resolve()), "numbers": self.numbers,
                "verbatim": self.verbatims}


def _code_default(code: str) -> float:
    module, _, attr = code.partition(":")
    func, _, param = attr.rpartition(".")
    obj = importlib.import_module(module)
    for part in func.split("."):
        obj = getattr(obj, part)
    return inspect.signature(obj).parameters[param].default

