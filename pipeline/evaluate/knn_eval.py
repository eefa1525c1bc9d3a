"""k-NN (and linear-probe) evaluation of a teacher backbone as Ray Data batch inference.

bank (labelled train images) and val: resize + centre crop (``pipeline.data.eval_sets``), one
forward per image in ``map_batches`` on an actor pool (each actor holds the backbone), then
weighted k-NN (``dino_model.knn``) on the driver. Every evaluation reports three rows on the same
images:

* ``knn_*``: the checkpoint's teacher;
* ``knn_init_*``: the same architecture and seed as the run's starting point, so
  ``knn_top1 - knn_init_top1`` is the gain from training;
* ``knn_pixels_*``: raw pixels of the same crops (a floor any learnt feature should beat).

``knn_top1`` is the figure at the fixed ``eval.headline_k`` (20, as in DINO), never the best k on
val. With ``linear=True`` a logistic-regression probe (C picked on a split of the bank) adds
``linear_top1``, ``linear_init_top1``, ``linear_pixels_top1``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray
import torch

from dino_model.features import embed, pixel_features
from dino_model.knn import NeighbourVotes, knn_figures, knn_metrics
from dino_model.linear_probe import linear_metrics
from dino_model.precision import resolve_precision
from pipeline.checkpoints import load_teacher_backbone, random_init_backbone
from pipeline.cluster import ClusterView
from pipeline.config import DinoConfig
from pipeline.data.eval_sets import EvalSets, build_eval_sets

log = logging.getLogger("dino_ray.evaluate")


class EmbedBatch:
    """``map_batches`` callable class: one actor holds the backbones (trained and/or random init)
    and emits one feature column per backbone (``feat_knn``, ``feat_knn_init``), so a single pass
    embeds everything. ``include_pixels`` adds ``feat_knn_pixels``: the crops flattened, still
    uint8 (4x fewer bytes through the object store than float; ``pixel_features`` converts them on
    the driver). ``probe`` (``{"n_last_blocks": n, "avgpool": b}``) adds DINO's linear-probe
    features (``feat_probe``, ``feat_probe_init``)."""

    def __init__(
        self,
        cfg: dict,
        checkpoint_path: str | None,
        include_random_init: bool,
        batch_size: int,
        include_pixels: bool = False,
        probe: dict | None = None,
    ) -> None:
        torch.set_num_threads(1)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.backbones: dict[str, torch.nn.Module] = {}
        if checkpoint_path:
            self.backbones[""], _ = load_teacher_backbone(checkpoint_path)
        if include_random_init:
            self.backbones["_init"] = random_init_backbone(DinoConfig.from_dict(cfg))
        for b in self.backbones.values():
            b.to(self.device).eval()
        # the run's own precision (fp16 on a CPU actor falls back to fp32)
        self.autocast = resolve_precision(
            DinoConfig.from_dict(cfg).train.precision, self.device, training=False
        ).autocast_dtype
        self.batch_size = batch_size
        self.include_pixels = include_pixels
        self.probe = probe

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"label": np.asarray(batch["label"], np.int64)}
        if "split" in batch:  # embed_sets tags bank (0) and val (1) rows of one pass
            out["split"] = batch["split"]
        images = batch["image"]
        for suffix, backbone in self.backbones.items():
            kw = {
                "device": self.device,
                "batch_size": self.batch_size,
                "autocast_dtype": self.autocast,
            }
            out[f"feat_knn{suffix}"] = embed(backbone, images, **kw).numpy()
            if self.probe is not None:
                out[f"feat_probe{suffix}"] = embed(backbone, images, **kw, **self.probe).numpy()
        if self.include_pixels:
            out["feat_knn_pixels"] = np.ascontiguousarray(images).reshape(len(images), -1)
        return out


def _tag(batch: dict[str, np.ndarray], split: int) -> dict[str, np.ndarray]:
    batch["split"] = np.full(len(batch["label"]), split, np.int8)
    return batch


def embed_sets(
    sets: EvalSets,
    cfg: DinoConfig,
    checkpoint_path: str | None,
    include_random_init: bool,
    *,
    include_pixels: bool = False,
    probe: dict | None = None,
) -> dict[str, Any]:
    """One Ray Data pass over bank + val:
    ``{name: (bank_feats, bank_labels, val_feats, val_labels)}`` with names ``knn``
    (checkpoint), ``knn_init``, ``knn_pixels`` (uint8, flattened) and, with ``probe``, ``probe``
    / ``probe_init``."""
    use_gpu = eval_on_gpu(cfg)
    ds = sets.bank.map_batches(_tag, fn_kwargs={"split": 0}, batch_format="numpy").union(
        sets.val.map_batches(_tag, fn_kwargs={"split": 1}, batch_format="numpy")
    )
    out = ds.map_batches(
        EmbedBatch,
        fn_constructor_kwargs={
            "cfg": cfg.model_dump(mode="json"),
            "checkpoint_path": checkpoint_path,
            "include_random_init": include_random_init,
            "batch_size": cfg.eval.batch_size,
            "include_pixels": include_pixels,
            "probe": probe,
        },
        batch_size=cfg.eval.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.eval.num_actors),
        num_cpus=0 if use_gpu else 1,
        num_gpus=1 if use_gpu else 0,
    )
    cols: dict[str, list] = {}
    for b in out.iter_batches(batch_size=4096, batch_format="numpy"):
        for k, v in b.items():
            cols.setdefault(k, []).append(v)
    if not cols:
        raise ValueError("empty evaluation set")
    arrays = {k: np.concatenate(v) for k, v in cols.items()}
    bank, val = arrays["split"] == 0, arrays["split"] == 1
    result = {}
    for k, feats in arrays.items():
        if k.startswith("feat_"):
            f = torch.from_numpy(feats)
            result[k[len("feat_") :]] = (
                f[bank],
                arrays["label"][bank],
                f[val],
                arrays["label"][val],
            )
    return result


def evaluate_knn(
    cfg: DinoConfig,
    checkpoint_path: str | None,
    *,
    sets: EvalSets | None = None,
    include_random_init: bool = True,
    include_pixels: bool = True,
    linear: bool = False,
    n_last_blocks: int = 1,
    avgpool: bool = False,
) -> dict[str, Any]:
    """All evaluation figures of a checkpoint (percent), on one pass over the eval images.

    k-NN, for ``knn`` (the checkpoint's teacher; skipped when ``checkpoint_path`` is None),
    ``knn_init`` (random init) and ``knn_pixels`` (raw pixels): ``{prefix}_top1_k{k}`` /
    ``{prefix}_top5_k{k}`` for each k in ``eval.k`` and ``eval.headline_k``, ``{prefix}_top1`` /
    ``{prefix}_top5`` at ``eval.headline_k``, ``{prefix}_bank_size`` / ``{prefix}_val_size``;
    ``knn_gain_top1`` = ``knn_top1 - knn_init_top1``.

    With ``linear``: ``linear_top1``, ``linear_init_top1``, ``linear_pixels_top1`` (plus ``_C``,
    ``_holdout_top1``), ``linear_gain_top1``, and the probe's ``linear_n_last_blocks`` /
    ``linear_avgpool`` (DINO's options; they need a timm ViT unless 1 / False).
    ``eval_images_decoded`` / ``eval_skipped_<reason>``: the images the evaluation read and the
    ones it skipped (a warning names them). Empty dict when the data carries no labels.
    """
    sets = sets or build_eval_sets(cfg)
    if sets is None:
        return {}
    if not linear:  # the bank streams through: memory flat in its size
        out = knn_streamed(sets, cfg, checkpoint_path, include_random_init, include_pixels)
        if "knn_top1" in out and "knn_init_top1" in out:
            out["knn_gain_top1"] = out["knn_top1"] - out["knn_init_top1"]
        return {**out, **sets.skip_figures()}
    # the linear probe fits on every bank feature: it holds them (bound the bank with eval.limit)
    # the probe reads other features than the k-NN only with DINO's options; else it reuses them
    probe = (
        {"n_last_blocks": n_last_blocks, "avgpool": avgpool}
        if linear and (n_last_blocks != 1 or avgpool)
        else None
    )
    feats = embed_sets(
        sets, cfg, checkpoint_path, include_random_init, include_pixels=include_pixels, probe=probe
    )
    if "knn_pixels" in feats:
        bank_px, bank_l, val_px, val_l = feats["knn_pixels"]
        feats["knn_pixels"] = (pixel_features(bank_px), bank_l, pixel_features(val_px), val_l)
    e = cfg.eval
    out: dict[str, Any] = {}
    for prefix in ("knn", "knn_init", "knn_pixels"):
        if prefix not in feats:
            continue
        bank_f, bank_l, val_f, val_l = feats[prefix]
        out.update(
            knn_metrics(
                bank_f,
                bank_l,
                val_f,
                val_l,
                ks=e.k,
                temperature=e.temperature,
                prefix=prefix,
                headline_k=e.headline_k,
            )
        )
        out[f"{prefix}_bank_size"] = int(len(bank_l))
        out[f"{prefix}_val_size"] = int(len(val_l))
        if linear:
            # pixels are probed on the same features as their k-NN; backbones on the probe's
            source = prefix.replace("knn", "probe") if probe and prefix != "knn_pixels" else prefix
            out.update(
                linear_metrics(
                    *feats[source], prefix=prefix.replace("knn", "linear"), seed=cfg.train.seed
                )
            )
    if "knn_top1" in out and "knn_init_top1" in out:
        out["knn_gain_top1"] = out["knn_top1"] - out["knn_init_top1"]
    if linear:
        out["linear_n_last_blocks"], out["linear_avgpool"] = int(n_last_blocks), int(avgpool)
        if "linear_top1" in out and "linear_init_top1" in out:
            out["linear_gain_top1"] = out["linear_top1"] - out["linear_init_top1"]
    return {**out, **sets.skip_figures()}


TEST_PREFIX = "test_"


def evaluate_test_split(
    cfg: DinoConfig, checkpoint_path: str, *, linear: bool = False, include_random_init: bool = True
) -> dict[str, Any]:
    """The once-only report on ``eval.test_path``: the k-NN (and probe) figures of
    ``evaluate_knn`` with the test split as queries and ``eval.train_path`` (else all of
    ``data.path``) as the bank, every key prefixed ``test_`` (``test_knn_top1``, ...)."""
    e = cfg.eval
    if e.test_path is None:
        raise ValueError("eval.test_path is not set")
    test_cfg = cfg.with_overrides(
        {"eval.val_path": e.test_path, "eval.train_path": e.train_path or cfg.data.path}
    )
    figures = evaluate_knn(
        test_cfg, checkpoint_path, include_random_init=include_random_init, linear=linear
    )
    return {f"{TEST_PREFIX}{k}": v for k, v in figures.items()}


def knn_streamed(
    sets: EvalSets,
    cfg: DinoConfig,
    checkpoint_path: str | None,
    include_random_init: bool,
    include_pixels: bool,
) -> dict[str, Any]:
    """k-NN figures without gathering the bank: the val rows are embedded first (kept: the
    queries), then the bank streams through in batches folded into ``NeighbourVotes`` (k_max
    best neighbours per query). The driver holds val features + val x k_max votes + one batch,
    whatever the bank size (a 50k-image bank and a 1.28M-image bank cost the same). Two passes,
    not one ordered union: Ray Data does not promise the order of a union's rows, and a bank row
    before the last val row cannot be folded."""
    e = cfg.eval
    ks = sorted(set(int(k) for k in e.k) | {int(e.headline_k)})
    use_gpu = eval_on_gpu(cfg)

    def embedded(ds: ray.data.Dataset):
        return ds.map_batches(
            EmbedBatch,
            fn_constructor_kwargs={
                "cfg": cfg.model_dump(mode="json"),
                "checkpoint_path": checkpoint_path,
                "include_random_init": include_random_init,
                "batch_size": e.batch_size,
                "include_pixels": include_pixels,
            },
            batch_size=e.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=e.num_actors),
            num_cpus=0 if use_gpu else 1,
            num_gpus=1 if use_gpu else 0,
        ).iter_batches(batch_size=1024, batch_format="numpy")

    def feats(name: str, x: np.ndarray) -> torch.Tensor:
        return pixel_features(x) if name == "knn_pixels" else torch.from_numpy(x)

    val_parts: dict[str, list] = {}
    for b in embedded(sets.val):
        for name in (k[len("feat_") :] for k in b if k.startswith("feat_")):
            val_parts.setdefault(name, []).append(b[f"feat_{name}"])
        val_parts.setdefault("label", []).append(b["label"])
    if not val_parts:
        raise ValueError("empty validation set")
    votes = {
        name: NeighbourVotes(feats(name, np.concatenate(parts)), max(ks))
        for name, parts in val_parts.items()
        if name != "label"
    }
    for b in embedded(sets.bank):
        for name, v in votes.items():
            v.add(feats(name, b[f"feat_{name}"]), torch.from_numpy(b["label"]))
    if not any(v.bank_size for v in votes.values()):
        raise ValueError("empty evaluation set (no bank images)")
    val_labels = torch.from_numpy(np.concatenate(val_parts["label"]))
    n_classes = (
        int(max(max(int(v.labels.max()) for v in votes.values()), int(val_labels.max()))) + 1
    )
    out: dict[str, Any] = {}
    for name, v in votes.items():
        res = v.classify(val_labels, ks=ks, temperature=e.temperature, num_classes=n_classes)
        out.update(knn_figures(res, name, e.headline_k))
        out[f"{name}_bank_size"] = int(v.bank_size)
        out[f"{name}_val_size"] = int(len(val_labels))
    return out


def eval_on_gpu(cfg: DinoConfig) -> bool:
    """GPU actors for the feature pass when the run trained on GPUs and the cluster has (or can
    get) one; otherwise CPU with a warning: a GPU-trained checkpoint evaluated on a CPU machine
    used to ask for GPU actors and wait forever."""
    if not cfg.train.use_gpu:
        return False
    if ClusterView.current().max_total("GPU") >= 1:
        return True
    log.warning(
        "train.use_gpu=true but this cluster has no GPU and cannot get one: the k-NN "
        "evaluation runs on CPU"
    )
    return False
