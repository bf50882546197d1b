"""exoticnorm: exotic normalization layers for PyTorch, with a registry and study tools."""

from . import functional, whitening
from .base import InputError, Norm, RunningStatsNorm
from .batchnorm import BatchNorm, BatchNormMean, BatchNormVar, FrozenAffineBatchNorm
from .fold import fold_norms
from .group_whitening import GroupWhitening
from .groupnorm import GroupNorm, InstanceNorm, LayerNorm
from .identity import NoNorm
from .registry import (
    NormConfigError,
    available_norms,
    convert_norms,
    create_norm,
    describe_norms,
    norm_options,
    register_norm,
)
from .norms import BUILTIN_NORMS
from .pit import PITNorm
from .running_batchnorm import RunningBatchNorm
from .sketch import QuantileSketch
from .structured import CirculantZCANorm, MonarchZCANorm
from .switchable import SwitchableWhitening
from .zca import BlockZCANorm, SparseZCANorm, ZCANorm

__version__ = "0.1.0"

__all__ = [
    "functional",
    "BUILTIN_NORMS",
    "whitening",
    "Norm",
    "RunningStatsNorm",
    "InputError",
    "BatchNorm",
    "BatchNormMean",
    "BatchNormVar",
    "FrozenAffineBatchNorm",
    "GroupNorm",
    "LayerNorm",
    "InstanceNorm",
    "NoNorm",
    "RunningBatchNorm",
    "PITNorm",
    "QuantileSketch",
    "ZCANorm",
    "BlockZCANorm",
    "SparseZCANorm",
    "MonarchZCANorm",
    "CirculantZCANorm",
    "GroupWhitening",
    "SwitchableWhitening",
    "NormConfigError",
    "register_norm",
    "available_norms",
    "describe_norms",
    "norm_options",
    "create_norm",
    "convert_norms",
    "fold_norms",
]
