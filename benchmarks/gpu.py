"""One prepared device run (issue #11): `exoticnorm bench`, `exoticnorm bench-whitening` and a
study per norm, through the real CLI, collected into results.json and results.md under --out.

    python benchmarks/gpu.py --device cuda --out gpu-results      # (benchmarks/gpu.sh)
    python benchmarks/gpu.py --device cpu --epochs 1 --limit-train 256 --repeats 1 \
        --train-steps 2 --whitening-channels 16 --out /tmp/smoke          # the test suite's smoke run

Each step is a subprocess, so a step that fails is recorded (exit code, last lines of its
output) and the others still run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

NORMS = "bn,zca,block-zca,sparse-zca,pit"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "exoticnorm", *args]


def _step(name: str, cmd: list[str], log: Path) -> dict:
    start = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    tail = log.read_text().splitlines()[-5:]
    return {"step": name, "command": " ".join(cmd[2:]), "rc": rc,
            "seconds": round(time.perf_counter() - start, 1), "tail": tail}


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
    steps = [_step("bench", _cli("bench", "--norms", a.norms, "--repeats", str(a.repeats), "--train-steps",
                                 str(a.train_steps), "--device", a.device, "--json", str(a.out / "bench.json")),
                   a.out / "bench.log"),
             _step("bench-whitening", _cli("bench-whitening", "--channels", a.whitening_channels, "--repeats", str(max(1, a.repeats // 10)),
                                           "--json", str(a.out / "bench-whitening.json")),
                   a.out / "bench-whitening.log")]
    studies = {}
    for norm in a.norms.split(","):
        run = a.out / f"study-{norm}"
        cmd = _cli("study", "--norm", norm, "--epochs", str(a.epochs), "--device", a.device,
                   "--wandb", "disabled", "--out", str(run))
        if a.data_dir:
            cmd += ["--data-dir", a.data_dir]
        if a.limit_train:
            cmd += ["--limit-train", str(a.limit_train), "--limit-test", str(a.limit_train)]
        steps.append(_step(f"study {norm}", cmd, a.out / f"study-{norm}.log"))
        summary = run / "summary.json"
        studies[norm] = json.loads(summary.read_text()) if summary.exists() else None
    (a.out / "results.json").write_text(json.dumps({"device": a.device, "steps": steps, "studies": studies},
                                                   indent=2) + "\n")
    md = [f"# exoticnorm on {a.device}", "", "| step | exit | seconds |", "|---|---|---|"]
    md += [f"| {s['step']} | {s['rc']} | {s['seconds']} |" for s in steps]
    md += ["", "## bench (same-run ratios)", ""] + _bench_rows(a.out / "bench.json")
    md += ["", f"## studies ({a.epochs} epochs)", "", "| norm | test acc | images/s |", "|---|---|---|"]
    for norm, s in studies.items():
        if s is None:
            md.append(f"| {norm} | failed | |")
        else:
            md.append(f"| {norm} | {s.get('test_acc')} | {s.get('images_per_sec')} |")
    (a.out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return max(s["rc"] for s in steps)


if __name__ == "__main__":
    sys.exit(main())
