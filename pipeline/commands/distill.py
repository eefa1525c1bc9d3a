"""`dino-ray distill --config FILE distill.teacher=SOURCE [section.field=value ...]`: distil a
frozen teacher into a student of ``model.arch``, evaluate it and register it (pipeline.distill_run).
"""

import argparse
import json

from pipeline.commands import add_address_argument, add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_address_argument(parser)


def run(args: argparse.Namespace) -> int:
    from pipeline.config import DinoConfig
    from pipeline.console import setup_console
    from pipeline.distill_run import run_distillation
    from pipeline.train import TrainingInterrupted

    cfg = DinoConfig.load(args.config, args.overrides)
    setup_console()
    try:
        out = run_distillation(cfg, address=args.address, config_path=args.config)
    except KeyboardInterrupt:
        raise TrainingInterrupted(
            "abandoned (second Ctrl-C); the MLflow run is marked KILLED"
        ) from None
    result = out.training
    summary = {
        "checkpoint_path": result.checkpoint_path,
        "run_dir": result.run_dir,
        "mlflow_run_id": result.mlflow_run_id,
        "teacher": out.lineage,
        "registered": f"{cfg.distill.registered_model}/{out.registered_version}"
        if out.registered_version is not None
        else None,
        "wall_s": round(result.wall_s, 1),
        "metrics": {
            k: v
            for k, v in result.metrics.items()
            if k.startswith(("knn_", "linear_", "epoch_loss", "epoch_distill"))
            and not k.endswith(("_size", "_C"))
            and "_k" not in k.removeprefix("knn_")
            or k in ("epoch", "step")
        },
    }
    print(json.dumps(summary, indent=1, default=str))
    return 0
