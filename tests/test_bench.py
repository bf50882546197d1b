"""The benchmark command runs and reports ratios (its numbers are not asserted: no timings in tests)."""

import json

from click.testing import CliRunner

from exoticnorm.bench import torch_batchnorm_lenet
from exoticnorm.cli import main
from torch import nn


def test_bench_prints_and_writes_ratios(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--norms", "bn,in", "--repeats", "1", "--train-steps", "2",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data["norms"]) == {"bn", "in"}
    assert data["norms"]["in"]["fwd_bwd_time_ratio"]["256x120"] is None  # nothing to normalize
    assert data["norms"]["in"]["norm_layers"] == "conv"
    assert data["norms"]["bn"]["lenet_speed_ratio"] > 0
    assert "(conv only)" in result.output


def test_bench_rejects_unknown_norm():
    result = CliRunner().invoke(main, ["bench", "--norms", "bn,nope"])
    assert result.exit_code == 1 and "unknown norm 'nope'" in result.output


def test_baseline_lenet_uses_torch_batchnorm():
    model = torch_batchnorm_lenet()
    kinds = [type(m) for m in model.norms().values()]
    assert kinds == [nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.BatchNorm1d]
