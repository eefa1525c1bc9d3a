"""Teacher backbones in the MLflow model registry: package (safetensors + arch.json + pyfunc),
register (tags, signature, champion aliases per eval_key), pull/load without running registry
code (validated arch.json)."""

from pipeline.registry.arch import ArchError, WeightsError
from pipeline.registry.champion import update_champion
from pipeline.registry.pull import list_models, load_backbone, pull
from pipeline.registry.register import EvalKeyConflictError, register_teacher

__all__ = [
    "ArchError",
    "EvalKeyConflictError",
    "WeightsError",
    "list_models",
    "load_backbone",
    "pull",
    "register_teacher",
    "update_champion",
]
