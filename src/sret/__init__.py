"""Sliced Recursive Transformer (SReT) on PyTorch and timm.

Importing the package registers every SReT variant with timm, so ``timm.create_model('sret_t')``
works as well as :func:`sret.create_model`.
"""

from sret.checkpoint import create_model, load_checkpoint, model_from_weights, save_weights
from sret.model import (
    MODEL_CONFIGS,
    RecursionSchedule,
    SReT,
    SReTConfig,
    StageConfig,
    checkpoint_filter_fn,
    official_stages,
)
from sret.runtime import tune_cpu_allocator

__version__ = "0.1.0"


def list_models() -> list[str]:
    """Names of the registered SReT variants."""
    return sorted(MODEL_CONFIGS)


__all__ = [
    "MODEL_CONFIGS",
    "RecursionSchedule",
    "SReT",
    "SReTConfig",
    "StageConfig",
    "__version__",
    "checkpoint_filter_fn",
    "create_model",
    "list_models",
    "load_checkpoint",
    "model_from_weights",
    "official_stages",
    "save_weights",
    "tune_cpu_allocator",
]
