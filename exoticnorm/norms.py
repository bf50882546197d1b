"""The built-in norms, registered by name in one place (the order of ``available_norms()``).

A norm of your own joins them with ``@exoticnorm.register_norm("name")`` on its class (or on a
factory ``f(num_features, **options)``); the contract test (tests/test_contract.py) covers every
registered norm.
"""

from __future__ import annotations

from .batchnorm import BatchNorm, BatchNormMean, BatchNormVar, FrozenAffineBatchNorm
from .groupnorm import GroupNorm, InstanceNorm, LayerNorm
from .identity import NoNorm
from .pit import PITNorm
from .registry import register_norm
from .running_batchnorm import RunningBatchNorm
from .group_whitening import GroupWhitening
from .structured import CirculantZCANorm, MonarchZCANorm
from .switchable import SwitchableWhitening
from .zca import BlockZCANorm, SparseZCANorm, ZCANorm

BUILTIN_NORMS = (
    ("bn", BatchNorm),
    ("bn-mean", BatchNormMean),
    ("bn-var", BatchNormVar),
    ("bn-frozen", FrozenAffineBatchNorm),
    ("gn", GroupNorm),
    ("ln", LayerNorm),
    ("in", InstanceNorm),
    ("none", NoNorm),
    ("pit", PITNorm),
    ("running-bn", RunningBatchNorm),
    ("zca", ZCANorm),
    ("block-zca", BlockZCANorm),
    ("sparse-zca", SparseZCANorm),
    ("monarch-zca", MonarchZCANorm),
    ("circulant-zca", CirculantZCANorm),
    ("group-whitening", GroupWhitening),
    ("switchable-whitening", SwitchableWhitening),
)

for _name, _cls in BUILTIN_NORMS:
    register_norm(_name)(_cls)
