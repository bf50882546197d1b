"""`exoticnorm bench-whitening` runs, loads an IterNorm file, and measures whitening error."""

import json

import torch
from click.testing import CliRunner

from exoticnorm.bench_whitening import block_whitening_error, correlated_input
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
    assert [r["channels"] for r in rows] == [8, 8]
    for r in rows:
        assert r["error"]["eigh"] < 1e-2 < r["error"]["iternorm"]  # BN standardizes, does not whiten
        assert r["eigh_over_iternorm"] > 0


def test_block_whitening_error_sees_correlation():
    x = correlated_input(32, 8, 4, 4)
    assert block_whitening_error(x, 4) > 1.0
    z = torch.randn(4000, 8, 1, 1)
    assert block_whitening_error(z, 8) < 0.1
