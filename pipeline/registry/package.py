"""The registered-model format of a DINO teacher backbone, and its MLflow pyfunc.

A package is a directory with two files and nothing executable in it::

    backbone.safetensors   the backbone's state dict (safetensors: loading runs no pickle)
    arch.json              how to rebuild the module: timm name + kwargs, embedding width,
                           trained resolutions, input normalisation, the DINO model section

This file is also the MLflow *model-from-code* file (``mlflow.pyfunc.log_model(python_model=
<this file>)``): MLflow copies it into the logged model and executes it on load, so it imports only
torch, timm, safetensors, numpy and mlflow -- never ``pipeline`` or ``dino_model`` -- and the
logged model loads anywhere those are installed. No pickled Python object is stored.

Whoever loads the pyfunc runs this file *as stored in the registry*, and ``load_package`` trusts
``arch.json``: both are for trusted registries. dino-ray's own ``load_backbone`` never runs it and
validates ``arch.json`` first (``pipeline.registry.arch``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import torch.nn as nn
from mlflow.models import set_model
from safetensors.torch import load_file, save_file

FORMAT = "dino-ray-backbone/1"
WEIGHTS_FILE = "backbone.safetensors"
ARCH_FILE = "arch.json"


def save_package(backbone: nn.Module, arch: dict[str, Any], directory: str | Path) -> Path:
    """Write ``backbone.safetensors`` + ``arch.json`` to ``directory``; return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach()
        .to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
        .contiguous()
        .clone()
        for k, v in backbone.state_dict().items()
    }
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    (directory / ARCH_FILE).write_text(json.dumps({"format": FORMAT, **arch}, indent=1))
    return directory


def build_module(arch: dict[str, Any]) -> nn.Module:
    """An untrained module of the architecture ``arch`` describes."""
    # imported where a module is built: timm costs 5.2 s of CPU on top of pipeline.registry
    # (measured: python -c, process_time), which imports this file for its constants and
    # save_package (`dino-ray models list`, `register`) and never builds a module here
    import timm  # noqa: PLC0415

    model = timm.create_model(arch["timm_name"], pretrained=False, **arch["timm_kwargs"])
    model.embed_dim = int(model.num_features)
    return model


def load_package(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the backbone from a package directory (or any directory that contains one):
    eval mode, no gradients."""
    directory = find_package(directory)
    arch = json.loads((directory / ARCH_FILE).read_text())
    if arch.get("format") != FORMAT:
        raise ValueError(f"{directory / ARCH_FILE}: unknown package format {arch.get('format')!r}")
    model = build_module(arch)
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad = False
    model.dino_arch = arch
    return model


def read_arch(directory: str | Path) -> dict[str, Any]:
    return json.loads((find_package(directory) / ARCH_FILE).read_text())


def find_package(directory: str | Path) -> Path:
    """The directory holding ``arch.json`` + weights: ``directory`` itself or one below it (a
    pulled MLflow model keeps them under ``artifacts/``)."""
    directory = Path(directory)
    if (directory / ARCH_FILE).is_file() and (directory / WEIGHTS_FILE).is_file():
        return directory
    for arch_file in sorted(directory.rglob(ARCH_FILE)):
        if (arch_file.parent / WEIGHTS_FILE).is_file():
            return arch_file.parent
    raise FileNotFoundError(f"no {ARCH_FILE} + {WEIGHTS_FILE} under {directory}")


class DinoBackbonePyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc: (N, 3, H, W) float32 normalised images -> (N, embed_dim) float32 embeddings.

    Any batch size; any H, W the backbone takes (ViTs interpolate their position embeddings; the
    trained resolutions are listed in ``arch.json``'s ``resolutions``)."""

    def load_context(self, context) -> None:
        self.model = load_package(Path(context.artifacts["arch"]).parent)

    # the ndarray hint: MLflow infers no schema from it (the signature is given explicitly when
    # the model is logged: any batch, any size) and stops warning that predict has no hints
    def predict(self, context, model_input: np.ndarray, params=None):  # noqa: ARG002
        if isinstance(model_input, dict):  # a named tensor input arrives as {name: array}
            (model_input,) = model_input.values()
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (N, 3, H, W) float32, got shape {tuple(x.shape)}")
        with torch.inference_mode():
            return self.model(x).float().numpy()


set_model(DinoBackbonePyfunc())
