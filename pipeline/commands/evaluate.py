"""`dino-ray evaluate CHECKPOINT_DIR [--config FILE] [eval.field=value ...]`: k-NN of a
checkpoint's teacher backbone (and of the random-init backbone) as Ray Data batch inference."""

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory or URI (or a run dir: its latest)")
    parser.add_argument("--config", "-c", default=None,
                        help="YAML config (default: the checkpoint's config.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    parser.add_argument("--address", default=None)
    parser.add_argument("--no-random-init", action="store_true",
                        help="skip the random-init baseline")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.config import ConfigError, DinoConfig, apply_override
    from pipeline.train.checkpoint import CONFIG_FILE, STATE_FILE, latest_checkpoint, load_config

    ckpt = args.checkpoint
    if "://" not in ckpt and not (Path(ckpt) / STATE_FILE).is_file():
        p = Path(ckpt)
        found = latest_checkpoint(str(p.parent), p.name) if p.is_dir() else None
        if found is None:
            print(f"dino-ray evaluate: no checkpoint at {ckpt}", file=sys.stderr)
            return 2
        ckpt = found
    try:
        if args.config:
            cfg = DinoConfig.load(args.config, args.overrides)
        else:
            from pipeline.train.checkpoint import as_local_dir

            with as_local_dir(ckpt) as d:
                if not (Path(d) / CONFIG_FILE).is_file():
                    raise ConfigError(f"{ckpt} has no {CONFIG_FILE}; pass --config")
                raw = load_config(d).model_dump(mode="json")
            for item in args.overrides:
                apply_override(raw, item)
            cfg = DinoConfig.from_dict(raw)
    except ConfigError as exc:
        print(f"dino-ray evaluate: {exc}", file=sys.stderr)
        return 2
    from pipeline.evaluate.knn_eval import evaluate_knn
    from pipeline.ray_runtime import ensure_ray

    ensure_ray(args.address)
    metrics = evaluate_knn(cfg, ckpt, include_random_init=not args.no_random_init)
    if not metrics:
        print("dino-ray evaluate: no labelled evaluation data (set eval.train_path/val_path)",
              file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": ckpt, **metrics}, indent=1))
    return 0
