"""`exoticnorm bench-sketch` runs and compares with KLL when datasketches is installed."""

import json

from click.testing import CliRunner

from exoticnorm.cli import main


def test_bench_sketch_reports_accuracy_and_speed(tmp_path):
    out = tmp_path / "s.json"
    result = CliRunner().invoke(main, ["bench-sketch", "--batches", "200", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data["accuracy"]) == {"normal", "bimodal", "lognormal"}
    assert data["ours_values_per_sec"] > 0
    for row in data["accuracy"].values():
        assert row["ours"] < 2e-3
        if "kll" in row:
            assert row["ours"] < row["kll"]

