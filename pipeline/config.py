"""Validated run configuration: one pydantic model per stage of the data flow.

A run is described by one YAML file plus ``section.field=value`` overrides. Every section forbids
unknown fields, so a typo such as ``optim.lr_rate`` is an error naming the field, not a silently
ignored key. Sections map onto the data flow: data -> augment -> model/loss/optim -> train ->
eval -> tracking (and tune for sweeps).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.redact import redact_obj


class ConfigError(ValueError):
    """A configuration problem, with the offending field named in the message."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """Where the images come from and how the CPU stage that decodes and crops them is sized."""

    path: str | list[str] = Field(
        "demo",
        description="Folder tree, Parquet file/folder, glob or list; any pyarrow URI. "
        "'demo' means the built-in digits corpus.",
    )
    format: Literal["auto", "folder", "parquet"] = "auto"
    image_column: str = "image"
    label_column: str | None = "label"
    num_actors: int = Field(1, ge=1, description="size of the decode+crop actor pool")
    cpus_per_actor: float = Field(1.0, gt=0)
    # Each call is one Ray task and one output block, with a fixed cost in the actor, the
    # executor and the raylet: 10k images x 3 epochs on 2 cores streamed 268 images/s at 16,
    # 338 at 32, 368 at 64 and 379 at 128 (bench/ingest.py; a block is ~0.5 MB an image)
    map_batch_size: int = Field(64, ge=1, description="images per decode+crop call")
    shuffle_files: bool = True
    shuffle_window: int = Field(
        8,
        ge=1,
        description="Parquet: row groups (drawn at random across files every epoch) whose "
        "rows one read task interleaves; a task holds this many groups' encoded bytes",
    )
    stream_rows: int = Field(
        4_000_000,
        ge=1,
        description="rows one Ray Data execution streams (whole epochs, at least "
        "one; the training loop opens the next when it ends): its read tasks live as long as the "
        "execution, so their number is bounded by this, not by train.epochs",
    )
    local_shuffle_buffer: int = Field(
        0, ge=0, description="rows in the trainer-side shuffle buffer"
    )
    limit: int | None = Field(
        None, ge=1, description="use N images spread evenly over the classes (seeded sample)"
    )
    data_cpu_limit: float | None = Field(
        None, gt=0, description="cap on CPUs Ray Data may hold; None = plan from the cluster"
    )
    max_skip_fraction: float = Field(
        0.1,
        ge=0,
        le=1,
        description="fail the run when more than this share of the images read "
        "could not be decoded (counts and example paths in the error)",
    )
    object_store_limit_mib: float | None = Field(
        None,
        gt=0,
        description="cap on object store Ray Data may fill ahead of the trainer "
        "(None = Ray's default share of the object store)",
    )


# Upper bounds on the crop recipe: every crop is decoded, rendered and shipped per image, so a
# value past these (a typo such as num_local=800 or global_size=22400) only finds out as an
# out-of-memory kill of a crop actor, which Ray Data restarts with the same batch, forever.
MAX_CROP_SIZE = 1024
MAX_LOCAL_CROPS = 32


class AugmentConfig(Section):
    """The official DINO multi-crop recipe; every number is configurable."""

    global_size: int = Field(224, ge=8, le=MAX_CROP_SIZE)
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_size: int = Field(96, ge=4, le=MAX_CROP_SIZE)
    local_scale: tuple[float, float] = (0.05, 0.4)
    num_local: int = Field(8, ge=0, le=MAX_LOCAL_CROPS)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    flip_p: float = Field(0.5, ge=0, le=1)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = Field(0.8, ge=0, le=1)
    grayscale_p: float = Field(0.2, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p_global1: float = Field(1.0, ge=0, le=1)
    blur_p_global2: float = Field(0.1, ge=0, le=1)
    blur_p_local: float = Field(0.5, ge=0, le=1)
    solarize_p_global2: float = Field(0.2, ge=0, le=1)
    solarize_threshold: int = Field(128, ge=0, le=256)
    photometric: Literal["cpu", "device"] = Field(
        "cpu",
        description="where jitter, grayscale, blur and solarize run: cpu = in the crop "
        "actors; device = the actors only crop, resize and flip, and each training worker applies "
        "the same recipe to the batch on its device (dino_model.photometric), for GPU nodes with "
        "few CPU cores (on a CPU training device it costs more than it saves: "
        "bench/photometric.py)",
    )
    draft_decode: bool = Field(
        True,
        description="decode JPEGs at 1/2..1/8 scale when every crop stays at full output "
        "resolution (same crop geometry, much faster on large images)",
    )
    max_image_pixels: int = Field(
        89_478_485,  # Pillow's own bomb limit (Image.MAX_IMAGE_PIXELS), 1024 x 1024 x 256 / 3
        ge=4096,
        description="most pixels an image is decoded at: a larger JPEG is decoded at 1/2..1/8 "
        "scale to fit, any other larger image is skipped and counted as too_large (a 150 MP "
        "image decoded in full can OOM-kill a crop actor)",
    )

    @field_validator("global_scale", "local_scale", "ratio", "blur_sigma")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1]):
            raise ValueError(f"expected 0 < low <= high, got {v}")
        return v

    @field_validator("global_scale", "local_scale")
    @classmethod
    def _fraction_of_image(cls, v: tuple[float, float]) -> tuple[float, float]:
        # a crop's area as a share of the image's: above 1 the crop cannot fit
        if v[1] > 1:
            raise ValueError(f"a crop is at most the whole image: high must be <= 1, got {v}")
        return v


class ModelConfig(Section):
    """Backbone and DINO head. ``arch`` is a short name (vit_tiny, vit_small, vit_base, resnet50)
    or any timm model name."""

    arch: str = "vit_small"
    patch_size: int | None = Field(16, ge=1, description="ViT patch size (None keeps timm's)")
    cifar_stem: bool = Field(
        False,
        description="ResNets: a 3x3 stride-1 stem without max-pool "
        "(for 32 px images; the ImageNet stem leaves 8 px to the blocks)",
    )
    drop_path_rate: float = Field(0.1, ge=0, lt=1)
    out_dim: int = Field(65536, ge=2, description="K, the number of prototypes")
    head_hidden_dim: int = Field(2048, ge=1)
    head_bottleneck_dim: int = Field(256, ge=1)
    head_layers: int = Field(3, ge=1)
    head_use_bn: bool = False
    norm_last_layer: bool = True
    num_registers: int = Field(
        0,
        ge=0,
        description="ViT register tokens (Darcet et al. 2024; DINOv2 with registers: 4): "
        "prefix tokens the blocks attend to; features are the CLS token, never a register",
    )
    init_from: str | None = Field(
        None,
        description="the backbone's first weights, for student and teacher (the head starts "
        "fresh): timm:NAME (timm's pretrained weights, downloaded by timm), a .safetensors file "
        "or URI (s3://, gs://), a registered model models:/NAME@ALIAS or models:/NAME/VERSION, "
        "or a dino-ray checkpoint or run directory/URI (its teacher backbone); None = random",
    )

    @field_validator("init_from")
    @classmethod
    def _init_source(cls, v: str | None) -> str | None:
        if v is not None:
            init_source(v)
        return v


class LossConfig(Section):
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp_epochs: int = Field(0, ge=0)
    center_momentum: float = Field(0.9, ge=0, lt=1)
    koleo_weight: float = Field(
        0.0,
        ge=0,
        description="KoLeo on the global crops' CLS features (DINOv2: 0.1); with ibot.enabled "
        "summed over the global views as DINOv2 does, else averaged over them",
    )
    centering: Literal["center", "sinkhorn_knopp"] = Field(
        "center",
        description="how the teacher targets of the DINO (and iBOT) loss are centred: center = "
        "the EMA centre of DINO; sinkhorn_knopp = DINOv2's balanced assignment of the global batch",
    )
    sinkhorn_iterations: int = Field(3, ge=1, description="Sinkhorn-Knopp iterations (DINOv2: 3)")


class IbotConfig(Section):
    """iBOT's masked-patch loss (DINOv2's ``ibot`` section, same names and defaults): the student
    sees a mask token at block-masked patches of its global crops and predicts the teacher's
    patch tokens of the unmasked crops. The teacher temperature schedule is the DINO loss's
    (``loss.teacher_temp``), as DINOv2 shares it; centring is ``loss.centering``."""

    enabled: bool = Field(False, description="train with iBOT + the DINOv2 step (ViTs only)")
    loss_weight: float = Field(1.0, ge=0, description="w_ibot of L = L_DINO + w_ibot L_iBOT + ...")
    mask_sample_probability: float = Field(
        0.5, ge=0, le=1, description="share of the global crops that are masked"
    )
    mask_ratio_min_max: tuple[float, float] = Field(
        (0.1, 0.5), description="a masked crop's share of masked patches ~ U(min, max)"
    )
    separate_head: bool = Field(
        False, description="a head of its own for the patches (else the DINO head serves them)"
    )
    head_n_prototypes: int | None = Field(
        None, ge=2, description="K_p of the separate head; None = model.out_dim"
    )
    student_temp: float = Field(0.1, gt=0)
    center_momentum: float = Field(0.9, ge=0, lt=1)

    @field_validator("mask_ratio_min_max")
    @classmethod
    def _ratio_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 <= v[0] <= v[1] <= 1):
            raise ValueError(f"expected 0 <= min <= max <= 1, got {v}")
        return v


class OptimConfig(Section):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(5e-4, gt=0, description="base lr for a global batch of 256 (see lr_scaling)")
    lr_scaling: Literal["linear", "sqrt"] = Field(
        "linear",
        description="how the lr follows the global batch G (also at each elastic resize): "
        "linear lr x G/256 (DINO), sqrt lr x sqrt(G/256)",
    )
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(10, ge=0)
    weight_decay: float = Field(0.04, ge=0)
    weight_decay_end: float = Field(0.4, ge=0)
    clip_grad: float = Field(3.0, ge=0, description="0 disables clipping")
    freeze_last_layer_epochs: int = Field(1, ge=0)
    freeze_backbone_epochs: int = Field(
        0,
        ge=0,
        description="with model.init_from: train the fresh DINO head alone for this many "
        "epochs (the backbone gets no update; the teacher's EMA still runs), then everything",
    )
    momentum_teacher: float = Field(0.996, ge=0, le=1)
    momentum_teacher_end: float = Field(1.0, ge=0, le=1)
    layer_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="ViT layer-wise lr decay: block i of L gets lr x layer_decay^(L - i) "
        "(DINOv2: 0.9); 1 = none",
    )
    patch_embed_lr_mult: float = Field(
        1.0, gt=0, description="lr factor of the patch embedding (DINOv2: 0.2)"
    )


def _whole(x: Any) -> bool:
    """A whole number of workers: an int, not a bool, a float or a string."""
    return isinstance(x, int) and not isinstance(x, bool)


class TrainConfig(Section):
    name: str = Field("dino", pattern=r"^[A-Za-z0-9_.\-]+$")

    @field_validator("name")
    @classmethod
    def _not_a_relative_folder(cls, v: str) -> str:
        # the name is a folder under storage_path: "." is storage_path itself, ".." its parent
        if set(v) == {"."}:
            raise ValueError(f"{v!r} names a folder above or at storage_path; give a run name")
        return v

    storage_path: str = Field(
        "./runs",
        description="where checkpoints live: a local folder on one machine; on a "
        "multi-node cluster s3://, gs:// (or a shared filesystem, see shared_filesystem)",
    )
    shared_filesystem: bool = Field(
        False,
        description="local paths (storage_path, data.path, eval.*_path) are on a "
        "filesystem mounted at the same path on every node (NFS): allow them on a multi-node "
        "cluster",
    )
    epochs: int = Field(100, ge=1)
    batch_size_per_worker: int = Field(64, ge=1)
    num_workers: int | tuple[int, int] = Field(
        1,
        description="Ray Train workers: n, or [min, max] for an elastic run that starts once min "
        "can be placed, grows to max as nodes join and shrinks to the survivors when one dies",
    )

    @field_validator("num_workers", mode="before")
    @classmethod
    def _count_or_pair(cls, v: Any) -> Any:
        # one line for any other shape (the union's own errors name both of its branches)
        pair = isinstance(v, (list, tuple)) and len(v) == 2
        items = v if pair else [v]
        if isinstance(v, (list, tuple)) and not pair or not all(_whole(x) for x in items):
            raise ValueError(f"give a number of workers or [min, max] (e.g. [1, 4]), got {v!r}")
        return tuple(int(x) for x in v) if pair else int(v)

    @field_validator("num_workers")
    @classmethod
    def _worker_count_or_range(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = v if isinstance(v, tuple) else (v, v)
        if not 1 <= low <= high:
            raise ValueError(f"needs 1 <= min <= max workers, got {list(v) if low != high else v}")
        return v

    elastic_resize_s: float = Field(
        60.0,
        gt=0,
        description="an elastic run (num_workers [min, max]) looks for room to grow every this "
        "many seconds (Ray Train's elastic_resize_monitor_interval_s)",
    )

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        """The largest world size: what the autoscaler is asked for and the schedules'
        reference global batch (``pipeline.train.elastic``)."""
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="autocast on every device: bf16 (CPU, Ampere+ GPUs) or fp16 with a "
        "grad scaler (CUDA only: V100, T4)",
    )
    seed: int = 0
    max_steps_per_epoch: int | None = Field(None, ge=1)
    max_wall_seconds: float | None = Field(None, gt=0, description="stop after this budget")
    checkpoint_every_epochs: int = Field(1, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1)
    max_preemptions: int = Field(
        -1,
        ge=-1,
        description="restarts after a node's preemption notice (spot / preemptible VMs), "
        "counted apart from max_failures; -1 = unlimited",
    )
    log_every_steps: int = Field(10, ge=1)
    resume: Literal["auto", "changed", "never"] = Field(
        "auto",
        description="a rerun with the same name: auto = continue only with the same "
        "config (more train.epochs allowed), changed = continue with a changed config, never = "
        "a fresh run under a new name",
    )
    deterministic_data: bool = Field(
        False, description="preserve Ray Data order (reproducible runs; slower streaming)"
    )


class EvalConfig(Section):
    """k-NN evaluation of the teacher backbone on a labelled train (bank) and val set."""

    train_path: str | list[str] | None = None
    val_path: str | list[str] | None = None
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="split of data.path when val_path is unset"
    )
    test_path: str | list[str] | None = Field(
        None,
        description="held-out test split, evaluated once at the end (bank: eval.train_path "
        "or all of data.path) and reported as test_knn_*; never used to choose anything: sweeps "
        "select on the validation split and report the best trial's test figure once",
    )
    every_epochs: int = Field(0, ge=0, description="0 = only after training")
    k: list[Annotated[int, Field(ge=1)]] = [10, 20, 100, 200]
    headline_k: int = Field(
        20,
        ge=1,
        description="k of the headline knn_top1/knn_top5 (fixed, as in the DINO paper, "
        "never the best k on the eval set); computed even when it is not in eval.k",
    )
    temperature: float = Field(0.07, gt=0)
    resize: int | None = Field(
        None, ge=1, description="shorter side before centre crop (default: global_size*8/7)"
    )
    batch_size: int = Field(256, ge=1)
    limit: int | None = Field(
        None,
        ge=1,
        description="images listed per eval set (spread evenly over classes, seeded); None = all",
    )
    in_training_limit: int = Field(
        10_000,
        ge=1,
        description="images listed for the in-training k-NN (spread evenly over "
        "classes): rank 0 holds them in memory, so this bounds it at any corpus size",
    )
    at_end: bool = Field(
        True, description="k-NN of the final teacher (and random init) after training"
    )
    num_actors: int = Field(1, ge=1, description="actor pool size of the feature batch inference")


class DistillConfig(Section):
    """``dino-ray distill``: a frozen teacher, a student of ``model.arch`` (any timm backbone)
    that matches the teacher's L2-normalised features through a small projection head
    (``dino_model.distill_loss``), on the same multi-crop stream as DINO."""

    teacher: str | None = Field(
        None,
        description="the frozen teacher: any model.init_from source (timm:NAME, a .safetensors "
        "file or URI, models:/NAME@ALIAS or models:/NAME/VERSION, a dino-ray checkpoint or run "
        "directory); required by dino-ray distill, refused by dino-ray train",
    )
    teacher_arch: str | None = Field(
        None,
        description="the teacher's timm architecture, for a .safetensors teacher only (a "
        "registered model, a checkpoint and timm:NAME say theirs)",
    )
    teacher_patch_size: int | None = Field(
        None, ge=1, description="a .safetensors ViT teacher's patch size (None keeps timm's)"
    )
    patch_tokens: Literal["auto", "on", "off"] = Field(
        "auto",
        description="also match the patch tokens: auto = when student and teacher are ViTs "
        "with the same patch size (the same grid on every crop); on = required",
    )
    cls_weight: float = Field(1.0, ge=0, description="weight of the CLS / pooled-feature term")
    patch_weight: float = Field(1.0, ge=0, description="weight of the patch-token term")
    head_hidden_dim: int = Field(
        1024, ge=1, description="hidden width of the student's projection heads"
    )
    linear_probe: bool = Field(
        True, description="the end-of-run evaluation adds a linear probe to the k-NN"
    )
    registered_model: str | None = Field(
        "dino-student",
        description="register the distilled student under this name (None: not registered); "
        "its version records the teacher as lineage",
    )

    @field_validator("patch_tokens", mode="before")
    @classmethod
    def _yaml_switch(cls, v: Any) -> Any:
        # YAML reads a bare on/off (distill.patch_tokens=on) as a boolean
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("teacher")
    @classmethod
    def _teacher_source(cls, v: str | None) -> str | None:
        if v is not None:
            init_source(v)
        return v


class TrackingConfig(Section):
    enabled: bool = True
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "dino-ray"
    registered_model: str | None = "dino-teacher"
    run_name: str | None = None
    http_timeout_s: float = Field(5.0, gt=0, description="per-request timeout of a remote server")


class TuneConfig(Section):
    num_samples: int = Field(4, ge=1)
    metric: str = "knn_top1"
    mode: Literal["max", "min"] = "max"
    search_space: dict[str, list[Any]] = Field(
        default_factory=lambda: {
            "loss.teacher_temp": [0.04, 0.07],
            "optim.momentum_teacher": [0.99, 0.996],
            "augment.num_local": [2, 6],
        },
        description="dotted field -> list of choices",
    )
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="cap; by default derived from ray.cluster_resources()"
    )
    grid: bool = Field(
        False,
        description="grid_search over every combination (x num_samples) "
        "instead of sampling num_samples random combinations",
    )
    register_best: bool = Field(True, description="register the best trial's teacher")


class DinoConfig(Section):
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    ibot: IbotConfig = IbotConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    tune: TuneConfig = TuneConfig()
    distill: DistillConfig = DistillConfig()

    @model_validator(mode="after")
    def _consistent(self) -> DinoConfig:
        if self.loss.warmup_teacher_temp_epochs > self.train.epochs:
            raise ValueError("loss.warmup_teacher_temp_epochs must not exceed train.epochs")
        if self.optim.freeze_backbone_epochs:
            if self.model.init_from is None:
                raise ValueError(
                    "optim.freeze_backbone_epochs needs model.init_from (it keeps a random "
                    "backbone random)"
                )
            if self.optim.freeze_backbone_epochs >= self.train.epochs:
                raise ValueError(
                    "optim.freeze_backbone_epochs must be below train.epochs (the backbone "
                    "would never train)"
                )
        if self.ibot.enabled:
            patch = self.model.patch_size
            if patch is None or self.augment.global_size % patch:
                raise ValueError(
                    f"ibot.enabled: the masks cover the patch grid of the global crops, so "
                    f"augment.global_size ({self.augment.global_size}) must be a multiple of "
                    f"model.patch_size ({patch})"
                )
        return self

    @property
    def mask_grid(self) -> int | None:
        """Patches per side of a global crop, the grid the iBOT masks cover (None: no iBOT)."""
        if not self.ibot.enabled or self.model.patch_size is None:
            return None
        return self.augment.global_size // self.model.patch_size

    # --- loading -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DinoConfig:
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> DinoConfig:
        """Read a YAML file (or start from defaults) and apply ``a.b=value`` overrides."""
        raw: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file not found: {p}")
            loaded = _load_yaml(p.read_text(), str(p)) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{p}: top level must be a mapping of sections")
            raw = loaded
        for item in overrides or []:
            apply_override(raw, item)
        return cls.from_dict(raw)

    def with_overrides(self, updates: dict[str, Any]) -> DinoConfig:
        """A copy with dotted-key updates applied (used by sweeps)."""
        raw = self.model_dump(mode="json")
        for key, value in updates.items():
            _set_dotted(raw, key, value)
        return DinoConfig.from_dict(raw)

    def to_yaml(self, redact: bool = False) -> str:
        """The config as YAML. ``redact=True`` masks URI passwords and signed-URL keys
        (``pipeline.redact``) for files people read (checkpoints, MLflow); keep the default where
        the YAML is loaded again to run (job submission)."""
        return yaml.safe_dump(self._dump(redact), sort_keys=False)

    def flat(self, redact: bool = False) -> dict[str, Any]:
        """``section.field -> value`` for logging as MLflow params (``redact`` as in to_yaml)."""
        out: dict[str, Any] = {}
        for section, values in self._dump(redact).items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out

    def _dump(self, redact: bool) -> dict[str, Any]:
        raw = self.model_dump(mode="json")
        return redact_obj(raw) if redact else raw


InitKind = Literal["timm", "models", "safetensors", "checkpoint"]
_TIMM = re.compile(r"timm:(?P<name>[A-Za-z0-9_.\-]+)")
_MODELS = re.compile(r"models:/[^/@\s]+(@[^/@\s]+|/[0-9]+)")


def init_source(text: str) -> InitKind:
    """The kind of a ``model.init_from`` source (read by ``pipeline.registry.init_from``);
    ``ValueError`` naming the accepted forms."""
    if text.startswith("timm:"):
        if not _TIMM.fullmatch(text):
            raise ValueError(f"{text!r}: expected timm:NAME, e.g. timm:vit_small_patch14_dinov2")
        return "timm"
    if text.startswith("models:"):
        if not _MODELS.fullmatch(text):
            raise ValueError(f"{text!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        return "models"
    if not text.strip() or (":" in text.split("/")[0] and "://" not in text):
        raise ValueError(
            f"{text!r}: expected timm:NAME, models:/NAME@ALIAS, models:/NAME/VERSION, a "
            ".safetensors file or URI, or a dino-ray checkpoint directory or URI"
        )
    return "safetensors" if text.endswith(".safetensors") else "checkpoint"


def apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.field=value")
    key, text = item.split("=", 1)
    _set_dotted(raw, key.strip(), _load_yaml(text, f"override {item!r}") if text.strip() else None)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping: PyYAML keeps the last,
    so a second ``train:`` section silently replaced the whole first one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (the second would replace the first; merge them)",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _load_yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML; a syntax error or a duplicated key is a one-line ``ConfigError``
    naming ``where`` and the line, not a multi-line parser traceback."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML: {problem}{at}") from None


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be section.field (e.g. train.epochs)")
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"{parts[0]}: expected a mapping")
    section[parts[1]] = value


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        lines.append(f"{where}: {err['msg']}")
    return "invalid config: " + "; ".join(lines)
