"""``dino-ray models export``: a registered backbone in a form other tools load without dino-ray.

    exported = export_model("models:/dino-teacher@champion", "teacher_timm", "timm")
    exported = export_model("models:/dino-teacher@champion", "teacher.onnx", "onnx")

The package is read as ``load_backbone`` reads it (validated ``arch.json``, safetensors only).

``timm``: a folder of two files, timm's own layout for a model folder:

* ``model.safetensors``: the backbone's state dict, the keys of ``timm.create_model(timm_name,
  num_classes=0, **model_args)`` (the registered file, unchanged);
* ``config.json``: ``architecture``, ``model_args`` (the constructor arguments the backbone was
  trained with: patch size, image size, ...) and ``pretrained_cfg`` (input size, mean/std, crop
  fraction of the evaluation), so both ``timm.create_model("local-dir:DIR", pretrained=True)`` and
  ``timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=dict(file=...), ...)``
  (the call ``Exported.usage`` spells out) rebuild it with timm alone.

A ResNet trained with ``model.cifar_stem`` has no timm constructor argument for its stem: it is
refused (``ExportError``); export it to ONNX instead.

``onnx``: one ``.onnx`` file (``DST`` itself when it ends in ``.onnx``, else ``DST/model.onnx``):
input ``images`` (N, 3, H, W) float32, normalised as ``arch.json`` says, output ``embedding``
(N, D). N is dynamic; so are H and W (a ViT's: multiples of its patch size, its position
embeddings resampled in the graph as in torch). Written by torch's dynamo exporter (the
TorchScript exporter fixes a ViT's position embeddings to the example size), then run with
onnxruntime against the torch module on two batches of different sizes: an output further than
``RTOL`` x |torch| + ``ATOL`` from torch's is an ``ExportError``; ``Exported.max_abs_diff`` is
the largest difference seen. The model's metadata records the source, the normalisation and the
width. Needs the ``onnx`` extra (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from torch.export import Dim

from pipeline.redact import redact
from pipeline.registry.pull import load_package_bytes, module_from_bytes

Format = Literal["timm", "onnx"]
FORMATS: tuple[str, ...] = ("timm", "onnx")
TIMM_WEIGHTS = "model.safetensors"
TIMM_CONFIG = "config.json"
ONNX_FILE = "model.onnx"
# fp32 through a different kernel library: the test ViT and ResNet differ by <= 2e-6
RTOL = 1e-4
ATOL = 1e-4


class ExportError(ValueError):
    """The backbone cannot be written in the asked format, or the written model disagrees."""


@dataclass(frozen=True)
class Exported:
    path: Path  # the folder (timm) or the .onnx file
    format: str
    usage: str  # how to load it, one Python expression
    max_abs_diff: float | None = None  # onnx: the largest |onnxruntime - torch| seen


def export_model(
    model_uri: str, dst: str | Path, fmt: Format, tracking_uri: str | None = None
) -> Exported:
    """Write the backbone of ``model_uri`` (anything ``load_backbone`` takes) to ``dst``."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    package = load_package_bytes(model_uri, tracking_uri)  # arch.json validated here
    source = redact(model_uri)
    if fmt == "timm":
        return export_timm(package["arch"], package["weights"], Path(dst), source)
    return export_onnx(module_from_bytes(package), package["arch"], Path(dst), source)


def timm_config(arch: dict[str, Any], source: str) -> dict[str, Any]:
    """timm's ``config.json`` of a model folder for the backbone ``arch`` describes."""
    # the validated arch lists every allowed argument, None where the backbone left timm's default
    kwargs = {k: v for k, v in arch["timm_kwargs"].items() if v is not None and k != "num_classes"}
    size = arch["eval_size"]
    return {
        "architecture": arch["timm_name"],
        "num_classes": 0,
        "num_features": arch["embed_dim"],
        "model_args": kwargs,
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "interpolation": "bicubic",
            "crop_pct": size / arch["eval_resize"],
            "crop_mode": "center",
            "mean": arch["input"]["mean"],
            "std": arch["input"]["std"],
            "num_classes": 0,
        },
        # read by nobody: where the folder came from
        "dino_ray": {"source": source, "resolutions": arch["resolutions"], "arch": arch["arch"]},
    }


def export_timm(arch: dict[str, Any], weights: bytes, dst: Path, source: str) -> Exported:
    if arch["model"].get("cifar_stem"):
        raise ExportError(
            f"{source}: a ResNet with model.cifar_stem has a stem timm cannot build "
            "(no constructor argument for it): export it with --format onnx"
        )
    dst.mkdir(parents=True, exist_ok=True)
    (dst / TIMM_WEIGHTS).write_bytes(weights)
    config = timm_config(arch, source)
    (dst / TIMM_CONFIG).write_text(json.dumps(config, indent=1))
    overlay = {"file": str(dst / TIMM_WEIGHTS), **config["pretrained_cfg"]}
    args = ", ".join(f"{k}={v!r}" for k, v in {"num_classes": 0, **config["model_args"]}.items())
    usage = (
        f"timm.create_model({arch['timm_name']!r}, pretrained=True, "
        f"pretrained_cfg_overlay={overlay!r}, {args})"
    )
    return Exported(path=dst, format="timm", usage=usage)


def export_onnx(module: nn.Module, arch: dict[str, Any], dst: Path, source: str) -> Exported:
    # the optional `onnx` extra: a base install has none of onnx, onnxscript, onnxruntime
    import onnxruntime  # noqa: PLC0415

    path = dst if dst.suffix == ".onnx" else dst / ONNX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.float().eval()
    size = arch["eval_size"]
    patch = _patch_size(module)
    if patch:  # a ViT: the grid size is the dynamic dimension
        height, width = patch * Dim("grid_h", min=1), patch * Dim("grid_w", min=1)
    else:
        height = width = Dim.AUTO
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        input_names=["images"],
        output_names=["embedding"],
        dynamic_shapes=({0: Dim("batch"), 2: height, 3: width},),
        verbose=False,
    )
    program.model.metadata_props.update(
        {
            "dino_ray.source": source,
            "dino_ray.timm_name": arch["timm_name"],
            "dino_ray.embed_dim": str(arch["embed_dim"]),
            "dino_ray.input": json.dumps(arch["input"]),
            "dino_ray.eval_size": str(size),
            "dino_ray.tolerance": f"rtol={RTOL:g}, atol={ATOL:g} against the torch module",
        }
    )
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    small = max(patch or 1, (size // 2) // (patch or 1) * (patch or 1))
    worst = 0.0
    for batch, side in ((3, size), (1, small)):
        x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = module(x).numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        if got.shape != want.shape:
            raise ExportError(
                f"{path}: onnxruntime gives shape {got.shape} for a ({batch}, 3, {side}, {side}) "
                f"batch, torch {want.shape}"
            )
        diff = np.abs(got - want)
        worst = max(worst, float(diff.max()))
        if not np.all(diff <= ATOL + RTOL * np.abs(want)):
            raise ExportError(
                f"{path}: onnxruntime's output differs from torch's on a ({batch}, 3, {side}, "
                f"{side}) batch by up to {float(diff.max()):.3g} (tolerance: rtol={RTOL:g}, "
                f"atol={ATOL:g})"
            )
    usage = f'onnxruntime.InferenceSession("{path}").run(None, {{"images": x}})'
    return Exported(path=path, format="onnx", usage=usage, max_abs_diff=worst)


def _patch_size(module: nn.Module) -> int | None:
    """A ViT's (square) patch size; None for other backbones."""
    patch_embed = getattr(module, "patch_embed", None)
    size = getattr(patch_embed, "patch_size", None)
    if size is None:
        return None
    return int(size[0] if isinstance(size, (tuple, list)) else size)
