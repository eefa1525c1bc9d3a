"""Teacher backbones in the MLflow model registry: package (safetensors + arch.json + pyfunc),
register (tags, signature, champion alias), pull/load, and Ray Data batch embedding."""

from pipeline.registry.pull import list_models, load_backbone, pull
from pipeline.registry.register import register_teacher

__all__ = ["list_models", "load_backbone", "pull", "register_teacher"]
