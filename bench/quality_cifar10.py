"""Quality benchmark: DINO on CIFAR-10 train for a fixed wall-clock budget, then weighted k-NN
top-1 on CIFAR-10 test (bank = train) for the trained teacher and the random-init backbone.

    python bench/quality_cifar10.py --minutes 15 [--config configs/cifar10.yaml] [a.b=value ...]

Prints one JSON object: trained / random-init k-NN, images/s, machine, command, config.
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, required=True, help="training wall-clock budget")
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs/cifar10.yaml"))
    ap.add_argument("--workdir", default=".dino-ray/bench-cifar10")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from pipeline.config import DinoConfig
    from pipeline.ray_runtime import ensure_ray
    from pipeline.train.trainer import run_training

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    name = f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = DinoConfig.load(args.config, [
        f"train.max_wall_seconds={args.minutes * 60}", f"train.storage_path={work / 'runs'}",
        f"train.name={name}", f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        "eval.every_epochs=0", "eval.at_end=true", *args.overrides])
    ensure_ray()
    t0 = time.monotonic()
    result = run_training(cfg, config_path=args.config)
    m = result.metrics
    hist = result.history
    steps = int(m.get("step", 0))
    train_s = float(m.get("wall_s", 0.0))
    images = steps * cfg.train.batch_size_per_worker * cfg.train.num_workers
    out = {
        "knn_top1_trained": m.get("knn_top1"),
        "knn_top1_random_init": m.get("knn_init_top1"),
        "knn_gain_top1": m.get("knn_gain_top1"),
        "knn_by_k": {k: {"trained": m.get(f"knn_top1_k{k}"), "random_init": m.get(f"knn_init_top1_k{k}")}
                     for k in cfg.eval.k},
        "bank_size": m.get("knn_bank_size"), "val_size": m.get("knn_val_size"),
        "epochs_done": len(hist), "steps": steps, "train_wall_s": round(train_s, 1),
        "images_per_s": round(images / train_s, 1) if train_s else None,
        "epoch_images_per_s_last": m.get("epoch_images_per_s"),
        "data_wait_fraction_last": m.get("epoch_data_wait_fraction"),
        "final_loss": m.get("epoch_loss"),
        "total_wall_s": round(time.monotonic() - t0, 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "gpu": _gpu(), "python": platform.python_version()},
        "command": " ".join([sys.executable, *sys.argv]),
        "config": cfg.model_dump(mode="json"),
        "checkpoint": result.checkpoint_path, "mlflow_run_id": result.mlflow_run_id,
    }
    print(json.dumps(out, default=str))
    return 0


def _gpu() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


if __name__ == "__main__":
    sys.exit(main())
