"""Batch inference: embed an image folder or Parquet corpus with a registered backbone.

Ray Data job: list the corpus (``pipeline.data.sources.list_corpus``), read rows of paths/encoded
bytes (no pixels in the object store), then ``map_batches(Embedder, compute=ActorPoolStrategy)``:
each actor rebuilds the backbone once from the package (safetensors bytes + arch, fetched once
by the driver and shipped through the object store), decodes, resizes + centre-crops to the
backbone's evaluation size (``pipeline.data.eval_crop``, as the k-NN evaluation) and embeds.
Output Parquet columns: ``id`` (file path, or ``file#row`` for Parquet), ``label`` (int64) and
``label_name`` when the corpus is labelled, ``embedding`` (list<float32>).

The package and the function that rebuilds its module come from the caller
(``pipeline.registry.pull.load_package_bytes`` / ``module_from_bytes`` for ``dino-ray models
embed``): evaluation sits below the registry and never imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
import torch

from dino_model.normalize import normalize_uint8
from pipeline.data.datasource import CorpusDatasource
from pipeline.data.eval_crop import center_crops
from pipeline.data.sources import CorpusError, list_corpus, resolve_filesystem
from pipeline.ray_runtime import ensure_ray


class OutputNotEmptyError(CorpusError):
    """``models embed``'s output folder already holds files (names it and the fix)."""


def check_output_empty(dst: str) -> None:
    """Refuse an output that is a file or a folder with anything in it: Ray Data adds its
    Parquet files to what is there, and the rows counted and read back would include the old
    ones (a rerun doubled the embeddings)."""
    fs, path = resolve_filesystem(dst)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return
    if info.type != pafs.FileType.Directory:
        raise OutputNotEmptyError(f"output {dst!r} is a file; give a new or empty folder")
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    if entries:
        raise OutputNotEmptyError(
            f"output {dst!r} is not empty ({len(entries)} entries): the embeddings would be added "
            "to what is there; give a new or empty folder, or remove it first"
        )


class Embedder:
    """Callable class for ``map_batches``: decode + resize/centre-crop + backbone forward."""

    def __init__(
        self,
        package: Any,
        build_module: Callable[[dict[str, Any]], Any],
        filesystem=None,
        image_size: int | None = None,
        resize: int | None = None,
        with_label: bool = False,
        class_names: list[str] | None = None,
        device: str = "cpu",
        original_labels: list[int] | None = None,
    ):
        cv2.setNumThreads(1)
        torch.set_num_threads(1)
        if isinstance(package, ray.ObjectRef):
            package = ray.get(package)
        self.model = build_module(package).to(device)
        arch = package["arch"]
        self.device = device
        self.image_size = int(image_size or arch.get("eval_size") or arch["resolutions"][0])
        self.resize = int(resize or round(self.image_size * 8 / 7))
        self.mean = tuple(arch.get("input", {}).get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(arch.get("input", {}).get("std", (0.229, 0.224, 0.225)))
        self.filesystem = filesystem
        self.with_label = with_label
        self.class_names = list(class_names or [])
        # class index -> the label as stored (Parquet labels are read as dense class indices)
        self.original_labels = None if original_labels is None else np.asarray(original_labels)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        # unreadable images are skipped, as in training
        crops = center_crops(batch, self.filesystem, self.image_size, self.resize)
        images, keep = crops.images, crops.keep
        x = normalize_uint8(torch.from_numpy(images[keep]), self.device, self.mean, self.std)
        with torch.inference_mode():
            emb = self.model(x).float().cpu().numpy() if len(x) else np.zeros((0, 1), np.float32)
        dim = emb.shape[1]
        flat = pa.array(emb.reshape(-1), pa.float32())
        offsets = pa.array(np.arange(0, (len(emb) + 1) * dim, dim, dtype=np.int32)[: len(emb) + 1])
        cols: dict[str, Any] = {
            "id": pa.array([str(k) for k in np.asarray(batch["key"])[keep]], pa.string())
        }
        if self.with_label and "label" in batch:
            labels = np.asarray(batch["label"], np.int64)[keep]
            stored = labels if self.original_labels is None else self.original_labels[labels]
            cols["label"] = pa.array(stored, pa.int64())
            if self.class_names:
                cols["label_name"] = pa.array(
                    [
                        self.class_names[j] if 0 <= j < len(self.class_names) else str(j)
                        for j in labels
                    ],
                    pa.string(),
                )
        cols["embedding"] = pa.ListArray.from_arrays(offsets, flat)
        return pa.table(cols)


@dataclass
class EmbedResult:
    output: str
    num_rows: int
    embed_dim: int


def embed_corpus(
    package: dict[str, Any],
    src: str | list[str],
    dst: str,
    *,
    build_module: Callable[[dict[str, Any]], Any],
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    batch_size: int = 64,
    image_size: int | None = None,
    resize: int | None = None,
    format: str = "auto",
    image_column: str = "image",
    label_column: str | None = "label",
    limit: int | None = None,
    address: str | None = None,
) -> EmbedResult:
    """Embed ``src`` (image folder tree or Parquet) into Parquet at ``dst`` with the backbone of
    ``package`` (``{"arch": dict, "weights": bytes}``), which each actor rebuilds with
    ``build_module(package)``: a module-level function, so Ray ships it by reference."""
    check_output_empty(dst)  # before any Ray work
    ensure_ray(address)
    corpus = list_corpus(src, format, image_column, label_column, limit)
    source = CorpusDatasource(corpus, shuffle=False, rows_per_task=batch_size)
    ds = ray.data.read_datasource(source, num_cpus=0.25)
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={
            "package": ray.put(package),
            "build_module": build_module,
            "filesystem": corpus.filesystem,
            "image_size": image_size,
            "resize": resize,
            "with_label": corpus.labelled,
            "class_names": list(corpus.class_names),
            "original_labels": corpus.original_labels() if corpus.label_map else None,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=max(1, int(num_actors))),
        num_cpus=cpus_per_actor,
    )
    ds.write_parquet(dst)
    out = ray.data.read_parquet(dst)
    return EmbedResult(dst, out.count(), int(package["arch"]["embed_dim"]))
