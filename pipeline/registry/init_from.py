"""``model.init_from``: read the backbone's first weights and check they fit, on the driver,
before Ray starts.

    init = resolve_init(cfg)   # InitWeights, or None without model.init_from
    blob = init.to_bytes()     # safetensors bytes: ray.put(blob) for the Train workers ...
    init.save(uri)             # ... or a file beside the checkpoints (local, s3://, gs://)

A worker then starts its student and teacher backbones from them with
``dino_model.init_weights.apply_init(backbone, safetensors.torch.load(blob))``: pure torch, so
``pipeline.train`` (which may not import this registry package) needs nothing from here.

The sources (``pipeline.config.init_source`` tells them apart):

* ``timm:NAME``: ``timm.create_model(NAME, pretrained=True, num_classes=0)``; timm downloads
  the weights on the machine that runs the driver (so, with a Hugging Face cache, once);
* a ``.safetensors`` file or URI (any pyarrow filesystem: s3://, gs://, ...): read with
  safetensors only, nothing unpickled;
* ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: ``pipeline.registry.load_backbone``,
  which validates ``arch.json`` and reads safetensors only;
* a dino-ray checkpoint directory or URI (or its run directory: the newest complete checkpoint
  in it): the EMA teacher's backbone.

``resolve_init`` loads them into a backbone built as the config builds it
(``dino_model.backbone.build_backbone``), so a missing or unexpected key, another patch size or
width fails here as a one-line ``InitSourceError`` (a ``ConfigError``), and the state it returns
fits the run's backbone key for key, shape for shape (position embeddings resampled already).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import pyarrow.fs as pafs
import torch
from mlflow.exceptions import MlflowException
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from dino_model.backbone import build_backbone
from dino_model.init_weights import InitReport, InitWeightsError, apply_init
from pipeline.checkpoints import STATE_FILE, load_teacher_backbone, newest_checkpoint
from pipeline.config import ConfigError, DinoConfig, init_source
from pipeline.data.sources import CorpusError, resolve_filesystem
from pipeline.redact import redact
from pipeline.registry.arch import ArchError, WeightsError
from pipeline.registry.pull import load_backbone

SOURCE_KEY = "init_from"  # the safetensors metadata key that records the (redacted) source


class InitSourceError(ConfigError):
    """``model.init_from`` cannot be read, or its weights do not fit ``model``'s backbone."""


@dataclass(frozen=True)
class InitWeights:
    """The checked first weights of a run's backbone.

    ``state``: the backbone's state dict (CPU, the backbone's dtypes), exactly its keys and
    shapes. ``source``: ``model.init_from`` with its secrets masked (for logs, tags, metadata).
    ``report``: the classifier keys dropped and position embeddings resampled on the way."""

    source: str
    state: dict[str, torch.Tensor]
    report: InitReport

    def to_bytes(self) -> bytes:
        return save_safetensors(self.state, metadata={SOURCE_KEY: self.source})

    def save(self, uri: str) -> str:
        """Write ``to_bytes()`` to ``uri`` (a local path or any pyarrow URI); return ``uri``."""
        fs, path = resolve_filesystem(uri)
        fs.create_dir(posixpath.dirname(path), recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(self.to_bytes())
        return uri


def resolve_init(cfg: DinoConfig, tracking_uri: str | None = None) -> InitWeights | None:
    """``cfg.model.init_from`` read (``tracking_uri``: the registry of a ``models:/`` source,
    default ``cfg.tracking.tracking_uri``) and loaded into the configured backbone; None when
    ``init_from`` is unset. ``InitSourceError`` when unreadable or unfit."""
    source = cfg.model.init_from
    if source is None:
        return None
    shown = redact(source)
    state = read_source(source, tracking_uri or cfg.tracking.tracking_uri)
    m = cfg.model
    backbone = build_backbone(
        m.arch,
        img_size=cfg.augment.global_size,
        patch_size=m.patch_size,
        cifar_stem=m.cifar_stem,
        num_registers=m.num_registers,  # a source with registers fits a backbone with as many
    )
    try:
        report = apply_init(backbone, state)
    except InitWeightsError as exc:
        raise InitSourceError(f"model.init_from {shown!r}: {exc}") from None
    own = {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}
    return InitWeights(source=shown, state=own, report=report)


def read_source(source: str, tracking_uri: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict a ``model.init_from`` source holds, unchecked (see the module docstring);
    ``InitSourceError`` naming the source when it cannot be read."""
    shown = redact(source)
    try:
        kind = init_source(source)
    except ValueError as exc:
        raise InitSourceError(f"model.init_from: {exc}") from None
    try:
        if kind == "timm":
            return _timm_state(source.removeprefix("timm:"))
        if kind == "models":
            return load_backbone(source, tracking_uri).state_dict()
        if kind == "safetensors":
            return _read_safetensors(source)
        return _checkpoint_state(source)
    except (OSError, SafetensorError, MlflowException, ArchError, WeightsError, CorpusError) as exc:
        reason = redact(" ".join(str(exc).split()))[:300] or type(exc).__name__
        raise InitSourceError(f"model.init_from {shown!r}: cannot read it: {reason}") from None


def _read_safetensors(uri: str) -> dict[str, torch.Tensor]:
    fs, path = resolve_filesystem(uri)
    with fs.open_input_stream(path) as f:
        return load_safetensors(f.read())


def _checkpoint_state(uri: str) -> dict[str, torch.Tensor]:
    """The teacher backbone of the checkpoint at ``uri``, or of the newest one when ``uri`` is
    a run directory (``train.storage_path``/``train.name``)."""
    fs, path = resolve_filesystem(uri)
    if fs.get_file_info(path.rstrip("/") + "/" + STATE_FILE).type != pafs.FileType.File:
        parent, name = uri.rstrip("/").rsplit("/", 1) if "/" in uri.rstrip("/") else (".", uri)
        found = newest_checkpoint(parent, name)
        if found is None:
            raise FileNotFoundError(
                f"no {STATE_FILE} there, and no complete checkpoint_* below it (expected a "
                ".safetensors file, a dino-ray checkpoint or its run directory)"
            )
        uri = found[1]
    backbone, _ = load_teacher_backbone(uri)
    return backbone.state_dict()


def _timm_state(name: str) -> dict[str, torch.Tensor]:
    # timm's import costs 6.5 s of CPU (dino_model.backbone); only this source calls timm itself
    import timm  # noqa: PLC0415

    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except RuntimeError as exc:  # an unknown name, or a name without pretrained weights
        raise InitSourceError(f"model.init_from 'timm:{name}': {exc}") from None
    return model.state_dict()
