"""Fetch registered teacher backbones: to a directory, or as a ready ``torch.nn.Module``.

``model_uri`` is anything MLflow resolves: ``models:/dino-teacher@champion``,
``models:/dino-teacher/3``, ``runs:/<run_id>/teacher_backbone`` or a local directory. A bare
``NAME@ALIAS`` or ``NAME/VERSION`` is read as ``models:/...``.

Nothing from the registry is executed here: ``load_backbone`` and the embed actors rebuild the
module from the validated ``arch.json`` and the safetensors weights (``pipeline.registry.arch``);
the downloaded pyfunc code (``package.py`` copy) is never imported.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import torch.nn as nn
from mlflow import MlflowClient

from pipeline.registry import package
from pipeline.registry.arch import build_verified, load_verified, parse_arch
from pipeline.tracking.global_uri import use_tracking_uri


def normalize_uri(model_uri: str) -> str:
    if (
        "://" in model_uri
        or model_uri.startswith(("models:/", "runs:/"))
        or Path(model_uri).exists()
    ):
        return model_uri
    return "models:/" + model_uri


def pull(model_uri: str, dst_dir: str | Path, tracking_uri: str | None = None) -> Path:
    """Download the whole MLflow model (MLmodel, pyfunc code, weights, arch.json) to ``dst_dir``."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    model_uri = normalize_uri(model_uri)
    if Path(model_uri).exists():
        shutil.copytree(model_uri, dst, dirs_exist_ok=True)
        return dst
    with use_tracking_uri(tracking_uri or mlflow.get_tracking_uri()):
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst))
    package.find_package(local)  # fail here, not later, if it is not one of ours
    return Path(local)


def load_backbone(
    model_uri: str, tracking_uri: str | None = None, device: str = "cpu"
) -> nn.Module:
    """The registered backbone as a ready module (eval mode, no grad). Only safetensors weights
    and the validated arch.json are read: nothing is unpickled, imported or executed, so a
    registry writer cannot run code here. Raises ``ArchError`` / ``WeightsError`` when the
    artifact was tampered with."""
    model_uri = normalize_uri(model_uri)
    if Path(model_uri).exists():
        return load_verified(model_uri, device=device)
    with tempfile.TemporaryDirectory(prefix="dino-pull-") as tmp:
        local = pull(model_uri, tmp, tracking_uri=tracking_uri)
        return load_verified(local, device=device)


def load_package_bytes(model_uri: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """``{"arch": dict, "weights": bytes}``: the package in memory, to ship to remote actors;
    ``arch`` is validated here already (fail before any actor starts)."""
    model_uri = normalize_uri(model_uri)
    with tempfile.TemporaryDirectory(prefix="dino-pull-") as tmp:
        local = Path(model_uri) if Path(model_uri).exists() else pull(model_uri, tmp, tracking_uri)
        pkg = package.find_package(local)
        spec = parse_arch((pkg / package.ARCH_FILE).read_text(), source=model_uri)
        return {
            "arch": spec.model_dump(mode="json"),
            "weights": (pkg / package.WEIGHTS_FILE).read_bytes(),
        }


def module_from_bytes(pkg: dict[str, Any]) -> nn.Module:
    """The module of a ``load_package_bytes`` result (validated again: it crossed processes)."""
    return build_verified(parse_arch(pkg["arch"]), pkg["weights"])


def list_models(tracking_uri: str, name: str | None = None) -> list[dict[str, Any]]:
    """One row per model version: name, version, aliases, knn_top1 (tag), eval_key, epochs,
    code_version, run."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    rows = []
    names = [name] if name else [m.name for m in client.search_registered_models()]
    for model_name in names:
        rm = client.get_registered_model(model_name)
        alias_of: dict[str, list[str]] = {}
        for alias, version in (rm.aliases or {}).items():
            alias_of.setdefault(str(version), []).append(alias)
        for mv in client.search_model_versions(f"name='{model_name}'"):
            tags = mv.tags or {}
            rows.append(
                {
                    "name": model_name,
                    "version": int(mv.version),
                    "aliases": ",".join(sorted(alias_of.get(str(mv.version), []))),
                    "knn_top1": tags.get("knn_top1", ""),
                    "eval_key": tags.get("eval_key", ""),
                    "epochs": tags.get("epochs", ""),
                    "arch": tags.get("arch", ""),
                    "code_version": tags.get("code_version", ""),
                    "run_id": mv.run_id or "",
                }
            )
    rows.sort(key=lambda r: (r["name"], -r["version"]))
    return rows
