"""One prepared device run (issue #11), collected into results.json and results.md under --out
(rewritten after every step, so a run cut short keeps what it finished):

- on CUDA, the CUDA tests (tests/test_cuda.py) and `exoticnorm bench` once per eigh route
  (EXOTICNORM_CUDA_EIGH = device, host: whitening.eigh_on_host);
- the c×c map's options timed and checked (benchmarks/cuda_eigh.py);
- `exoticnorm bench` (the default route), a study per norm and `exoticnorm bench-whitening`,
  through the real CLI.

    python benchmarks/gpu.py --device cuda --out gpu-results      # (benchmarks/gpu.sh)
    python benchmarks/gpu.py --device cpu --epochs 1 --limit-train 256 --repeats 1 \
        --train-steps 2 --whitening-channels 16 --out /tmp/smoke          # the test suite's smoke run

Each step is a subprocess, so a step that fails is recorded (exit code, last lines of its
output) and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

NORMS = "bn,zca,block-zca,sparse-zca,pit"
ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "exoticnorm", *args]


def _step(name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    start = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}).returncode
    tail = log.read_text().splitlines()[-5:]
    shown = " ".join([*(f"{k}={v}" for k, v in (env or {}).items()), *cmd[1:]])
    return {"step": name, "command": shown, "rc": rc, "seconds": round(time.perf_counter() - start, 1), "tail": tail}


def _bench_rows(path: Path) -> list[str]:
    """`exoticnorm bench --json`: per norm, time ratios per layer shape and the LeNet img/s ratio."""
    if not path.exists():
        return ["(no results: see the step's log)"]
    norms = json.loads(path.read_text())["norms"]
    shapes = list(next(iter(norms.values()))["fwd_bwd_time_ratio"])
    rows = ["| norm | " + " | ".join(shapes) + " | LeNet img/s ratio |", "|---" * (len(shapes) + 2) + "|"]
    for norm, row in norms.items():
        cells = ["n/a" if v is None else f"{v:.2f}x" for v in row["fwd_bwd_time_ratio"].values()]
        lenet = row.get("lenet_speed_ratio")
        rows.append(f"| {norm} | " + " | ".join(cells) + f" | {'' if lenet is None else f'{lenet:.2f}'} |")
    return rows


def _eigh_rows(path: Path) -> list[str]:
    """benchmarks/cuda_eigh.py --json: ms (and max|W Σ Wᵀ − I|) per option and size."""
    if not path.exists():
        return ["(no results: see the step's log)"]
    rows = json.loads(path.read_text())["rows"]
    options = [k[:-3] for k in rows[0] if k.endswith("_ms")]
    md = ["| G | c | " + " | ".join(f"{k} ms (err)" for k in options) + " |", "|---" * (len(options) + 2) + "|"]
    for r in rows:
        md.append(f"| {r['groups']} | {r['c']} | " +
                  " | ".join(f"{r[k + '_ms']:.3f} ({r[k + '_err']:.0e})" for k in options) + " |")
    return md


def _write(a, steps: list[dict], studies: dict, benches: list[str]) -> str:
    (a.out / "results.json").write_text(json.dumps({"device": a.device, "steps": steps, "studies": studies},
                                                   indent=2) + "\n")
    md = [f"# exoticnorm on {a.device}", "", "| step | exit | seconds | command |", "|---|---|---|---|"]
    md += [f"| {s['step']} | {s['rc']} | {s['seconds']} | `{s['command']}` |" for s in steps]
    for name in benches:
        md += ["", f"## {name} (same-run ratios)", ""] + _bench_rows(a.out / f"{name}.json")
    md += ["", "## the c×c map's options", ""] + _eigh_rows(a.out / "eigh-options.json")
    md += ["", f"## studies ({a.epochs} epochs)", "", "| norm | test acc | images/s |", "|---|---|---|"]
    for norm, s in studies.items():
        md.append(f"| {norm} | failed | |" if s is None else
                  f"| {norm} | {s.get('test_acc')} | {s.get('images_per_sec')} |")
    text = "\n".join(md) + "\n"
    (a.out / "results.md").write_text(text)
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=Path("gpu-results"))
    p.add_argument("--norms", default=NORMS)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--whitening-channels", default="64,128,256,512,1024")
    p.add_argument("--data-dir", default=None, help="FashionMNIST folder (default: the CLI's search)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    steps, studies, benches = [], {}, []

    def record(step: dict) -> None:
        steps.append(step)
        _write(a, steps, studies, benches)

    def bench(name: str, env: dict[str, str] | None = None) -> None:
        benches.append(name)
        record(_step(name, _cli("bench", "--norms", a.norms, "--repeats", str(a.repeats), "--train-steps",
                                str(a.train_steps), "--device", a.device, "--json", str(a.out / f"{name}.json")),
                     a.out / f"{name}.log", env))

    cuda = a.device.startswith("cuda")
    if cuda:
        record(_step("cuda tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                    str(ROOT / "tests" / "test_cuda.py")], a.out / "cuda-tests.log"))
    record(_step("eigh options", [sys.executable, str(ROOT / "benchmarks" / "cuda_eigh.py"), "--device", a.device,
                                  "--repeats", str(max(3, a.repeats // 5)), "--json", str(a.out / "eigh-options.json")],
                 a.out / "eigh-options.log"))
    bench("bench")
    if cuda:
        for route in ("device", "host"):
            bench(f"bench-eigh-{route}", {"EXOTICNORM_CUDA_EIGH": route})
    for norm in a.norms.split(","):
        run = a.out / f"study-{norm}"
        cmd = _cli("study", "--norm", norm, "--epochs", str(a.epochs), "--device", a.device,
                   "--wandb", "disabled", "--out", str(run))
        if a.data_dir:
            cmd += ["--data-dir", a.data_dir]
        if a.limit_train:
            cmd += ["--limit-train", str(a.limit_train), "--limit-test", str(a.limit_train)]
        step = _step(f"study {norm}", cmd, a.out / f"study-{norm}.log")
        summary = run / "summary.json"
        studies[norm] = json.loads(summary.read_text()) if summary.exists() else None
        record(step)
    record(_step("bench-whitening", _cli("bench-whitening", "--channels", a.whitening_channels, "--repeats",
                                         str(max(1, a.repeats // 10)), "--device", a.device,
                                         "--json", str(a.out / "bench-whitening.json")),
                 a.out / "bench-whitening.log"))
    print(_write(a, steps, studies, benches))
    return max(s["rc"] for s in steps)


if __name__ == "__main__":
    sys.exit(main())
