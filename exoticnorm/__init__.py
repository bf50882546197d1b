"""exoticnorm: exotic normalization layers for PyTorch, with a registry and study tools."""

from . import functional
from .base import InputError, Norm, RunningStatsNorm
from .batchnorm import BatchNorm, BatchNormMean, BatchNormVar, FrozenAffineBatchNorm
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
from .running_batchnorm import RunningBatchNorm

__version__ = "0.1.0"

__all__ = [
    "functional",
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
    "NormConfigError",
    "register_norm",
    "available_norms",
    "describe_norms",
    "norm_options",
    "create_norm",
    "convert_norms",
]
