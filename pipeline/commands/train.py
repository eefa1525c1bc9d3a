"""`dino-ray train --config configs/NAME.yaml [section.field=value ...]`."""

import argparse
import json

from pipeline.commands import add_address_argument, add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_address_argument(parser)


def run(args: argparse.Namespace) -> int:
    from pipeline.config import DinoConfig
    from pipeline.console import setup_console
    from pipeline.train import TrainingInterrupted
    from pipeline.train.finish import headline_line
    from pipeline.training_run import run_training

    cfg = DinoConfig.load(args.config, args.overrides)
    setup_console()
    try:
        result = run_training(cfg, address=args.address, config_path=args.config)
    except KeyboardInterrupt:
        raise TrainingInterrupted(
            "abandoned (second Ctrl-C); the MLflow run is marked KILLED"
        ) from None
    summary = {
        "checkpoint_path": result.checkpoint_path,
        "run_dir": result.run_dir,
        "mlflow_run_id": result.mlflow_run_id,
        "tracking_uri": cfg.tracking.tracking_uri if cfg.tracking.enabled else None,
        "wall_s": round(result.wall_s, 1),
        # which set the headline k-NN was measured on: the whole validation split at the end of
        # the run (knn_*), else only the in-training subset (subset_knn_*)
        "headline": headline_line(result.metrics, cfg.eval.headline_k),
        "metrics": {
            k: v
            for k, v in result.metrics.items()
            if k.startswith(
                ("knn_top1", "knn_init_top1", "knn_pixels_top1", "knn_gain", "epoch_loss")
            )
            or k.startswith(("subset_knn_top1", "subset_knn_init_top1", "subset_knn_pixels_top1"))
            or k in ("epoch", "step", "knn_val_size", "knn_bank_size", "subset_knn_val_size")
        },
    }
    print(json.dumps(summary, indent=1, default=str))
    return 0
