"""``none``: the no-norm baseline, so "no normalization" is one more registered name."""

from __future__ import annotations

from torch import Tensor

from .base import Norm

__all__ = ["NoNorm"]


class NoNorm(Norm):
    """No normalization: y = x (the channel count is still checked)."""

    _convertible_state = ()

    def __init__(self, num_features: int, device=None, dtype=None) -> None:
        super().__init__(num_features, affine=False, device=device, dtype=dtype)

    def _normalize(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return str(self.num_features)
