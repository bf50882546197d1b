"""benchmarks/gpu.py (issue #11's device run) end to end on the CPU: a smoke test, not a timing."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_runs_on_cpu(tmp_path, fake_data):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--out", str(out),
         "--norms", "bn,zca,pit", "--epochs", "1", "--limit-train", "256", "--repeats", "1",
         "--train-steps", "2", "--whitening-channels", "16", "--data-dir", str(fake_data)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [s["step"] for s in results["steps"]] == ["eigh options", "bench", "study bn", "study zca", "study pit",
                                                     "bench-whitening"]
    assert all(s["rc"] == 0 for s in results["steps"]), results["steps"]
    for norm in ("bn", "zca", "pit"):
        summary = results["studies"][norm]
        assert summary["status"] == "finished" and 0.0 <= summary["test_acc"] <= 1.0
    bench = json.loads((out / "bench.json").read_text())
    assert set(bench["norms"]) == {"bn", "zca", "pit"}
    assert all(r["lenet_speed_ratio"] > 0 for r in bench["norms"].values())
    eigh = json.loads((out / "eigh-options.json").read_text())["rows"]
    assert all(r["device_err"] < 0.1 for r in eigh), eigh  # exact eigh whitens (float32, c ≤ 512)
    md = (out / "results.md").read_text()
    assert "| zca |" in md and "| study pit | 0 |" in md and "| 1 | 120 |" in md
