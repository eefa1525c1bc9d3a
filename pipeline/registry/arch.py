"""Rebuild a registered backbone without trusting the registry: a validated ``arch.json`` and
safetensors weights, nothing imported or executed from the artifact.

``arch.json`` is checked against ``ArchSpec`` (pydantic, unknown fields refused, strict types):
the timm name must be a known backbone (``dino_model.backbone.is_known_backbone``) and the timm
constructor gets only the allow-listed arguments of ``TimmKwargs`` -- what
``pipeline.registry.register.arch_description`` writes. Weights are read with ``safetensors``
only (no pickle) and must match the module exactly.

    spec = parse_arch(json_text, source="models:/dino-teacher/3")   # ArchError if tampered
    module = build_verified(spec, weights_bytes)                      # eval mode, no grad
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file

from dino_model.backbone import is_known_backbone, use_cifar_stem
from pipeline.config import ModelConfig
from pipeline.registry.package import ARCH_FILE, FORMAT, WEIGHTS_FILE, find_package


class ArchError(ValueError):
    """``arch.json`` of a registered backbone is invalid (tampered, or from another tool)."""


class WeightsError(ValueError):
    """``backbone.safetensors`` does not fit the architecture ``arch.json`` describes."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TimmKwargs(_Strict):
    """The only arguments passed to ``timm.create_model`` (never ``pretrained``: no download)."""

    num_classes: Literal[0] = 0
    img_size: int | None = Field(None, ge=8, le=4096)
    patch_size: int | None = Field(None, ge=1, le=256)
    dynamic_img_size: bool | None = None
    global_pool: Literal["token", "avg", ""] | None = None
    drop_path_rate: float | None = Field(None, ge=0, lt=1)
    reg_tokens: int | None = Field(None, ge=1, le=256)  # ViT register tokens (model.num_registers)


class InputSpec(_Strict):
    layout: Literal["NCHW"]
    dtype: Literal["float32"]
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)
    scale: str = Field(max_length=200)


class ArchSpec(_Strict):
    """The whole ``arch.json`` (see ``register.arch_description``)."""

    format: Literal[FORMAT]  # type: ignore[valid-type] - a constant string
    arch: str = Field(max_length=200)
    timm_name: str = Field(max_length=200)
    timm_kwargs: TimmKwargs
    embed_dim: int = Field(ge=1)
    resolutions: list[int] = Field(min_length=1)
    eval_size: int = Field(ge=1)
    eval_resize: int = Field(ge=1)
    input: InputSpec
    model: ModelConfig

    @field_validator("timm_name")
    @classmethod
    def _known(cls, name: str) -> str:
        if not is_known_backbone(name):
            raise ValueError(f"unknown timm backbone {name!r}")
        return name


def parse_arch(raw: str | bytes | dict[str, Any], source: str = ARCH_FILE) -> ArchSpec:
    """Validate ``arch.json`` (its text, or the parsed dict); raise a one-line ``ArchError``
    naming ``source`` and the first bad field."""
    try:
        if isinstance(raw, dict):
            # one code path: a dict is judged exactly as its JSON text would be
            raw = json.dumps(raw)
        return ArchSpec.model_validate_json(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(document)"
        raise ArchError(
            f"{source}: arch.json field {field!r}: {err['msg']} "
            f"(re-register the model with dino-ray register)"
        ) from None


def build_verified(spec: ArchSpec, weights: bytes | str | Path) -> nn.Module:
    """The module ``spec`` describes with ``weights`` (safetensors bytes or file) loaded strictly:
    eval mode, no gradients, ``module.dino_arch`` = the validated arch dict."""
    # timm is imported where a module is built (as in dino_model.backbone): it costs 5.2 s of
    # CPU on top of this package (measured: python -c, process_time), which `dino-ray models
    # list` / `models pull` and registering a module in memory never need
    import timm  # noqa: PLC0415

    kwargs = spec.timm_kwargs.model_dump(exclude_none=True)
    model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    if spec.model.cifar_stem:
        use_cifar_stem(model)
    model.embed_dim = int(model.num_features)
    if model.embed_dim != spec.embed_dim:
        raise ArchError(
            f"arch.json field 'embed_dim': says {spec.embed_dim}, the architecture "
            f"gives {model.embed_dim} (re-register the model)"
        )
    state = load_bytes(weights) if isinstance(weights, bytes) else load_file(str(weights))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise WeightsError(
            f"{WEIGHTS_FILE} does not match arch.json: {first[0].strip()} (re-register the model)"
        ) from None
    model.eval()
    for p in model.parameters():
        p.requires_grad = False
    model.dino_arch = spec.model_dump(mode="json")
    return model


def load_verified(directory: str | Path, device: str = "cpu") -> nn.Module:
    """Rebuild the backbone from a package directory (or one that contains it, e.g. a pulled
    MLflow model) using only ``arch.json`` (validated) and ``backbone.safetensors``."""
    pkg = find_package(directory)
    spec = parse_arch((pkg / ARCH_FILE).read_text(), source=str(pkg / ARCH_FILE))
    return build_verified(spec, pkg / WEIGHTS_FILE).to(device)
