"""`exoticnorm bench-whitening` runs every variant, loads an IterNorm file, and measures whitening error."""

import json

import pytest
import torch
from click.testing import CliRunner

from exoticnorm.bench_whitening import (block_whitening_error, circulant_input, correlated_input,
                                        whitening_errors)
from exoticnorm.cli import main

FAKE_ITERNORM = '''
import torch
from torch import nn

class IterNorm(nn.Module):
    """Stand-in with the published constructor and its expanded running_wm buffer."""
    def __init__(self, num_features, num_groups=1, num_channels=None, T=5, dim=4, eps=1e-5,
                 momentum=0.1, affine=True):
        super().__init__()
        g = num_features // num_channels
        self.register_buffer("running_wm", torch.eye(num_channels).expand(g, num_channels, num_channels))
        self.bn = nn.BatchNorm2d(num_features)

    def forward(self, x):
        self.running_wm.mul_(1.0)  # fails unless the buffer was made contiguous
        return self.bn(x)
'''


def test_bench_whitening_with_an_iternorm_file(tmp_path):
    path = tmp_path / "iterative_normalization.py"
    path.write_text(FAKE_ITERNORM)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["bench-whitening", "--iternorm", str(path), "--channels", "8",
                                       "--group", "4", "--repeats", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    by = {r["variant"]: r for r in rows}
    assert {r["channels"] for r in rows} == {8}
    assert {"zca", "zca cholesky", "zca pca", "block-zca 4", "block-zca 4 newton5", "monarch-zca",
            "monarch-zca pca", "circulant-zca", "group-whitening", "switchable-whitening",
            "IterNorm 4"} == set(by)
    for exact in ("zca", "zca cholesky", "zca pca"):
        assert by[exact]["err"] < 1e-2 and by[exact]["off"] < 1e-2
    assert by["block-zca 4"]["block"] < 1e-2 < by["block-zca 4"]["off"]  # blocks only
    assert by["IterNorm 4"]["block"] > 1e-2  # the stand-in standardizes, does not whiten
    assert by["circulant-zca"]["circ"] < 0.2 < by["circulant-zca"]["err"]  # its assumption
    assert all(r["ms"] > 0 for r in rows) and by["zca"]["over_zca"] == 1.0


def test_block_whitening_error_sees_correlation():
    x = correlated_input(32, 8, 4, 4)
    assert block_whitening_error(x, 4) > 1.0
    z = torch.randn(4000, 8, 1, 1)
    assert block_whitening_error(z, 8) < 0.1


def test_errors_split_into_blocks_and_between():
    x = correlated_input(64, 8, 4, 4)
    e = whitening_errors(x, 4)
    assert e["err"] == max(e["block"], e["off"]) and e["off"] > 0.5
    c = circulant_input(500, 8, 4, 4)
    cov = torch.cov(c.transpose(0, 1).reshape(8, -1).double())
    assert abs(cov[0, 1] - cov[3, 4]) < 0.05 and abs(cov[0, 7] - cov[0, 1]) < 0.05  # wrapped, stationary


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a GPU")
def test_device_without_cuda_is_a_clear_error():
    result = CliRunner().invoke(main, ["bench-whitening", "--channels", "8", "--device", "cuda"])
    assert result.exit_code == 2
    assert "--device cuda was asked for but CUDA is not available" in result.output
