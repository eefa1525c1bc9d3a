"""Quality benchmark: DINO on a Parquet train split for a fixed wall-clock budget, then the k-NN
top-1 at the headline k (20) and a linear probe on the test split (bank / probe training set =
the train split), for the trained teacher, the random-init backbone and raw pixels.

    python bench/quality_cifar10.py --minutes 15 [--config configs/cifar10_cpu.yaml]
        [--train ../shared/data/cifar10/train --test ../shared/data/cifar10/test] [a.b=value ...]

Any Parquet corpus works (``--train`` / ``--test``, paths relative to the working directory or
URIs). The test split is only reported, never used to choose anything (the probe picks C on a
split of the train features). Prints one JSON object: trained / random-init / pixel k-NN and
linear probe, images/s, machine, command, config.
The schedules are laid out for ``train.epochs`` epochs; the wall-clock budget
(``train.max_wall_seconds``) stops training cleanly (all ranks agree) and keeps the last state.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._corpus import command_line  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, required=True, help="training wall-clock budget")
    ap.add_argument(
        "--config", default=str(Path(__file__).resolve().parents[1] / "configs/cifar10.yaml")
    )
    ap.add_argument("--workdir", default=".dino-ray/bench-cifar10")
    ap.add_argument("--train", help="train split (default: the config's data.path)")
    ap.add_argument("--test", help="test split (default: the config's eval.test_path)")
    ap.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from pipeline.config import DinoConfig
    from pipeline.ray_runtime import ensure_ray
    from pipeline.training_run import run_training

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    name = f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    base = DinoConfig.load(args.config, args.overrides)
    train = args.train or base.data.path
    test = args.test or base.eval.test_path
    if test is None:
        ap.error("no test split: pass --test or set eval.test_path in the config")
    # nothing is selected here, so SSL trains on the whole train split, the k-NN bank is the
    # whole train split and the queries are the test split, reported once at the end
    cfg = DinoConfig.load(
        args.config,
        [
            f"train.max_wall_seconds={args.minutes * 60}",
            f"train.storage_path={work / 'runs'}",
            f"train.name={name}",
            f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
            "eval.every_epochs=0",
            "eval.at_end=true",
            f"data.path={train}",
            f"eval.train_path={train}",
            f"eval.val_path={test}",
            "eval.test_path=null",
            *args.overrides,
        ],
    )
    ensure_ray()
    t0 = time.monotonic()
    result = run_training(cfg, config_path=args.config)
    m = dict(result.metrics)
    hist = result.history
    if not args.no_linear and result.checkpoint_path:
        from pipeline.evaluate.knn_eval import evaluate_knn

        m.update(evaluate_knn(cfg, result.checkpoint_path, linear=True))
    steps = int(m.get("step", 0))
    train_s = float(m.get("wall_s", 0.0))
    images = steps * cfg.train.batch_size_per_worker * cfg.train.max_workers
    out = {
        "knn_top1_trained": m.get("knn_top1"),
        "knn_top1_random_init": m.get("knn_init_top1"),
        "knn_top1_pixels": m.get("knn_pixels_top1"),
        "knn_gain_top1": m.get("knn_gain_top1"),
        "headline_k": cfg.eval.headline_k,
        "knn_by_k": {
            k: {
                "trained": m.get(f"knn_top1_k{k}"),
                "random_init": m.get(f"knn_init_top1_k{k}"),
                "pixels": m.get(f"knn_pixels_top1_k{k}"),
            }
            for k in sorted(set(cfg.eval.k) | {cfg.eval.headline_k})
        },
        "linear_top1_trained": m.get("linear_top1"),
        "linear_top1_random_init": m.get("linear_init_top1"),
        "linear_top1_pixels": m.get("linear_pixels_top1"),
        "bank_size": m.get("knn_bank_size"),
        "val_size": m.get("knn_val_size"),
        "epochs_done": len(hist),
        "steps": steps,
        "train_wall_s": round(train_s, 1),
        "images_per_s": round(images / train_s, 1) if train_s else None,
        "epoch_images_per_s_last": m.get("epoch_images_per_s"),
        "data_wait_fraction_last": m.get("epoch_data_wait_fraction"),
        "final_loss": m.get("epoch_loss"),
        "total_wall_s": round(time.monotonic() - t0, 1),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "gpu": _gpu(),
            "python": platform.python_version(),
        },
        "command": command_line(),
        "config": cfg.model_dump(mode="json"),
        "checkpoint": result.checkpoint_path,
        "mlflow_run_id": result.mlflow_run_id,
    }
    print(json.dumps(out, default=str))
    return 0


def _gpu() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


if __name__ == "__main__":
    sys.exit(main())
