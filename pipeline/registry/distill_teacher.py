"""``distill.teacher``: read the frozen teacher of ``dino-ray distill`` on the driver, before Ray
starts, and check it against the run.

    teacher = resolve_teacher(cfg)    # TeacherSpec + state; DistillTeacherError (one line)
    blob = teacher.to_bytes()         # pipeline.train.distill_teacher.pack: for ray.put

Any ``model.init_from`` source is a teacher (``pipeline.registry.init_from.read_source``), with
its architecture from where it is written down:

* ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``: the version's validated ``arch.json``
  (``load_package_bytes``); the lineage is ``models:/NAME/VERSION`` (an alias resolved now);
* a dino-ray checkpoint (or run directory: its newest): the EMA teacher and its ``config.yaml``;
* ``timm:NAME``: timm's architecture ``NAME`` (downloaded by timm on this machine);
* a ``.safetensors`` file or URI: ``distill.teacher_arch`` (and ``distill.teacher_patch_size``).

The weights are loaded into the backbone built from that (``apply_init``: the keys, the patch
size and the width must fit; position embeddings are resampled to ``augment.global_size``), and
``distill.patch_tokens`` is decided against the student (``model``): both ViTs of one patch size.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import pyarrow.fs as pafs
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from safetensors.torch import load as load_safetensors

from dino_model.backbone import build_backbone, is_vit
from dino_model.init_weights import InitWeightsError, apply_init
from pipeline.checkpoints import STATE_FILE, load_teacher_backbone, newest_checkpoint
from pipeline.config import ConfigError, DinoConfig, init_source
from pipeline.data.sources import CorpusError, resolve_filesystem
from pipeline.redact import redact
from pipeline.registry.arch import ArchError, WeightsError
from pipeline.registry.init_from import InitSourceError, read_source
from pipeline.registry.pull import load_package_bytes
from pipeline.train.distill_teacher import TeacherSpec, pack


class DistillTeacherError(ConfigError):
    """``distill.teacher`` cannot be read, or does not fit the run."""


@dataclass(frozen=True)
class DistillTeacher:
    spec: TeacherSpec
    state: dict[str, torch.Tensor]  # the built backbone's own keys and shapes

    def to_bytes(self) -> bytes:
        return pack(self.spec, self.state)


def resolve_teacher(cfg: DinoConfig, tracking_uri: str | None = None) -> DistillTeacher:
    """``cfg.distill.teacher`` read, built and checked (module docstring); ``tracking_uri``: the
    registry of a ``models:/`` source (default ``cfg.tracking.tracking_uri``)."""
    d = cfg.distill
    if d.teacher is None:
        raise DistillTeacherError(
            "distill.teacher: not set; give the teacher (models:/NAME@ALIAS, a checkpoint, a "
            ".safetensors file with distill.teacher_arch, or timm:NAME)"
        )
    shown = redact(d.teacher)
    uri = tracking_uri or cfg.tracking.tracking_uri
    kind = init_source(d.teacher)
    try:
        build, state, lineage = _read(cfg, d.teacher, kind, uri)
    except InitSourceError as exc:  # read_source names model.init_from: this is distill.teacher
        raise DistillTeacherError(
            str(exc).replace("model.init_from", "distill.teacher", 1)
        ) from None
    except (OSError, MlflowException, ArchError, WeightsError, CorpusError) as exc:
        reason = redact(" ".join(str(exc).split()))[:300] or type(exc).__name__
        raise DistillTeacherError(f"distill.teacher {shown!r}: cannot read it: {reason}") from None
    try:
        backbone = build_backbone(build["arch"], **{k: v for k, v in build.items() if k != "arch"})
    except ValueError as exc:  # an unknown timm name: the message names model.arch
        msg = str(exc).replace("model.arch", "distill.teacher_arch")
        raise DistillTeacherError(f"distill.teacher {shown!r}: {msg}") from None
    try:
        apply_init(backbone, state)
    except InitWeightsError as exc:
        raise DistillTeacherError(f"distill.teacher {shown!r}: {exc}") from None
    _check_crops(cfg, backbone, build["arch"], shown)
    spec = TeacherSpec(
        **build,
        embed_dim=int(backbone.embed_dim),
        patch_tokens=_patch_tokens(cfg, backbone, build["arch"]),
        source=shown,
        lineage=lineage,
    )
    own = {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}
    return DistillTeacher(spec, own)


def _read(cfg: DinoConfig, source: str, kind: str, tracking_uri: str):
    """(build_backbone kwargs, state dict, lineage) of the source."""
    size = cfg.augment.global_size
    plain = dict(img_size=size, cifar_stem=False, num_registers=0)
    if kind == "models":
        pkg = load_package_bytes(source, tracking_uri)
        m = pkg["arch"]["model"]
        build = dict(
            arch=m["arch"],
            img_size=pkg["arch"]["eval_size"],
            patch_size=m["patch_size"],
            cifar_stem=m["cifar_stem"],
            num_registers=m["num_registers"],
        )
        return build, load_safetensors(pkg["weights"]), _registry_version(source, tracking_uri)
    if kind == "checkpoint":
        backbone, tcfg = load_teacher_backbone(_checkpoint(source))
        tm = tcfg.model
        build = dict(
            arch=tm.arch,
            img_size=tcfg.augment.global_size,
            patch_size=tm.patch_size,
            cifar_stem=tm.cifar_stem,
            num_registers=tm.num_registers,
        )
        return build, backbone.state_dict(), redact(source)
    if kind == "timm":
        name = source.removeprefix("timm:")
        return dict(arch=name, patch_size=None, **plain), read_source(source), source
    arch = cfg.distill.teacher_arch
    if arch is None:
        raise DistillTeacherError(
            f"distill.teacher_arch: a .safetensors teacher ({redact(source)!r}) needs its timm "
            "architecture, e.g. distill.teacher_arch=vit_small distill.teacher_patch_size=16"
        )
    build = dict(arch=arch, patch_size=cfg.distill.teacher_patch_size, **plain)
    return build, read_source(source), redact(source)


def _checkpoint(uri: str) -> str:
    """``uri`` when it is a checkpoint, else the newest complete one of the run directory."""
    fs, path = resolve_filesystem(uri)
    if fs.get_file_info(posixpath.join(path, STATE_FILE)).type == pafs.FileType.File:
        return uri
    parent, _, name = uri.rstrip("/").rpartition("/")
    found = newest_checkpoint(parent or ".", name)
    if found is None:
        raise FileNotFoundError(
            f"no {STATE_FILE} there and no complete checkpoint_* below it (expected a "
            ".safetensors file, models:/..., timm:NAME, a dino-ray checkpoint or its run directory)"
        )
    return found[1]


def _registry_version(source: str, tracking_uri: str) -> str:
    """``models:/NAME/VERSION`` of a ``models:/`` source, its alias resolved now."""
    name, sep, alias = source.removeprefix("models:/").partition("@")
    if not sep:
        return source
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = client.get_model_version_by_alias(name, alias).version
    return f"models:/{name}/{version}"


def _check_crops(cfg: DinoConfig, teacher: torch.nn.Module, arch: str, shown: str) -> None:
    """A ViT teacher sees the student's crops: its patch must tile them (else its forward fails
    on the workers, after Ray started)."""
    if not is_vit(arch):
        return
    patch = teacher.patch_embed.patch_size[0]
    a = cfg.augment
    for name, size in (
        ("augment.global_size", a.global_size),
        ("augment.local_size", a.local_size),
    ):
        if size % patch and (name == "augment.global_size" or a.num_local):
            raise DistillTeacherError(
                f"distill.teacher {shown!r}: its patch size {patch} does not divide {name}={size} "
                "(the teacher sees the student's crops): choose crop sizes that both tile"
            )


def _patch_tokens(cfg: DinoConfig, teacher: torch.nn.Module, teacher_arch: str) -> bool:
    """``distill.patch_tokens`` against the two networks: the patch term needs two ViTs whose
    patches tile every crop alike (one patch size)."""
    mode = cfg.distill.patch_tokens
    if mode == "off":
        return False
    student_patch = _patch_size(cfg)
    teacher_patch = tuple(teacher.patch_embed.patch_size) if is_vit(teacher_arch) else None
    fits = student_patch is not None and student_patch == teacher_patch
    if mode == "on" and not fits:
        raise DistillTeacherError(
            f"distill.patch_tokens=on: the patch tokens are matched only between two ViTs of one "
            f"patch size; the student {cfg.model.arch!r} has {student_patch or 'no patches'}, the "
            f"teacher {teacher_arch!r} {teacher_patch or 'no patches'} (use auto or off)"
        )
    return fits


def _patch_size(cfg: DinoConfig) -> tuple[int, int] | None:
    """The student's patch (None for a CNN): built to read timm's default when unset."""
    m = cfg.model
    if not is_vit(m.arch):
        return None
    if m.patch_size is not None:
        return (m.patch_size, m.patch_size)
    student = build_backbone(m.arch, img_size=cfg.augment.global_size)
    return tuple(student.patch_embed.patch_size)
