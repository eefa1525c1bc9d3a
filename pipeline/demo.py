"""The main job (`make demo`): digits corpus -> embedded Ray -> DINO on 2 CPU workers -> k-NN vs the
random-init backbone -> MLflow (SQLite under the workdir) -> teacher backbone in the registry."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import ray.data
from mlflow.exceptions import MlflowException

from pipeline.config import DinoConfig
from pipeline.console import setup_console
from pipeline.data.demo_corpus import build_digits_corpus
from pipeline.ray_runtime import ensure_ray
from pipeline.registry.register import register_teacher
from pipeline.train.failures import TrainingError
from pipeline.training_run import run_training

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def run_demo(workdir: str | Path, overrides: list[str] | None = None) -> int:
    setup_console()
    t0 = time.monotonic()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = build_digits_corpus(workdir / "digits", size=32)
    db = workdir / "mlflow.db"
    uri = f"sqlite:///{db}"
    name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"  # a fresh run each time (same name = resume)
    cfg = DinoConfig.load(
        CONFIG,
        [
            f"data.path={corpus}",
            f"train.storage_path={workdir / 'runs'}",
            f"train.name={name}",
            f"tracking.tracking_uri={uri}",
            *(overrides or []),
        ],
    )
    print(f"[demo] corpus: {corpus} (1,797 handwritten digits, 10 classes)", flush=True)
    ensure_ray(quiet=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        result = run_training(cfg, config_path=CONFIG)
    except TrainingError as exc:
        print(f"[demo] training failed: {exc}", file=sys.stderr)
        return 1
    m = result.metrics
    version = _register(result, cfg, uri)
    wall = time.monotonic() - t0
    ks = cfg.eval.k
    print("\n[demo] done in %.0f s" % wall)
    print(
        f"[demo] trained {cfg.train.epochs} epochs x {m.get('iters_per_epoch')} steps "
        f"({cfg.model.arch}, patch {cfg.model.patch_size}, K={cfg.model.out_dim}) on "
        f"{cfg.train.max_workers} CPU workers ({m.get('backend')}); final loss "
        f"{m.get('epoch_loss', float('nan')):.3f}"
    )
    print(
        f"[demo] k-NN top-1 at the end of the run on the whole {cfg.eval.val_fraction:.0%} split "
        f"held out of SSL training ({int(m.get('knn_val_size', 0)):,} images; bank = the rest):"
    )
    for k in sorted(set(ks) | {cfg.eval.headline_k}):
        print(
            f"         k={k:<4d} trained {m.get(f'knn_top1_k{k}', float('nan')):6.2f}%   "
            f"random init {m.get(f'knn_init_top1_k{k}', float('nan')):6.2f}%   "
            f"raw pixels {m.get(f'knn_pixels_top1_k{k}', float('nan')):6.2f}%"
        )
    gain = m.get("knn_gain_top1", float("nan"))
    print(
        f"[demo] gain over the random-init backbone at k={cfg.eval.headline_k}: "
        f"{gain:+.2f} points; trained vs raw pixels: "
        f"{m.get('knn_top1', float('nan')) - m.get('knn_pixels_top1', float('nan')):+.2f}"
    )
    print(f"[demo] checkpoint: {result.checkpoint_path}")
    print(f"[demo] MLflow run: {result.mlflow_run_id} (experiment {cfg.tracking.experiment!r})")
    if version is not None:
        print(f"[demo] registered model: {cfg.tracking.registered_model} version {version}")
    print(f"[demo] look at it:  mlflow ui --backend-store-uri {uri}")
    print(
        json.dumps(
            {
                "wall_s": round(wall, 1),
                "knn_top1": m.get("knn_top1"),
                "knn_init_top1": m.get("knn_init_top1"),
                "knn_gain_top1": gain,
                "knn_pixels_top1": m.get("knn_pixels_top1"),
                "mlflow_run_id": result.mlflow_run_id,
                "model_version": version,
            }
        )
    )
    if not gain > 0:
        print(
            "[demo] WARNING: no k-NN gain over the random-init backbone at this budget "
            "(train longer: train.epochs=...)",
            file=sys.stderr,
        )
    return 0


def _register(result, cfg, uri: str) -> int | None:
    if not cfg.tracking.registered_model or not result.checkpoint_path:
        return None
    try:
        return register_teacher(
            result.checkpoint_path,
            metrics=result.metrics,
            run_id=result.mlflow_run_id,
            tracking_uri=uri,
            name=cfg.tracking.registered_model,
        )
    # the store refused or is unreachable (MlflowException), a file could not be read or written
    # (OSError), the run records another evaluation (EvalKeyConflictError, a ValueError): the
    # demo still reports what it trained, and the checkpoint is still there
    except (MlflowException, OSError, ValueError) as exc:
        print(f"[demo] registering the teacher failed: {exc}", file=sys.stderr)
        return None
