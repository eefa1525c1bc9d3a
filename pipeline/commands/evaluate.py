"""`dino-ray evaluate CHECKPOINT_DIR [--config FILE] [--linear [--n-last-blocks N] [--avgpool]]
[eval.field=value ...]`: k-NN (at the fixed eval.headline_k) of a checkpoint's teacher backbone,
of the random-init backbone and of raw pixels, as Ray Data batch inference; ``--linear`` adds a
logistic-regression probe on the same three. A table goes to stderr, the JSON to stdout."""

import argparse
import json
import sys
from pathlib import Path

from pipeline.commands import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory or URI (or a run dir: its latest)")
    parser.add_argument(
        "--config", "-c", default=None, help="YAML config (default: the checkpoint's config.yaml)"
    )
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    parser.add_argument("--address", default=None)
    parser.add_argument(
        "--no-random-init", action="store_true", help="skip the random-init baseline"
    )
    parser.add_argument("--no-pixels", action="store_true", help="skip the raw-pixel baseline")
    parser.add_argument(
        "--linear",
        action="store_true",
        help="also a linear probe (logistic regression; C picked on the bank)",
    )
    parser.add_argument(
        "--n-last-blocks",
        type=int,
        default=1,
        help="probe on the CLS tokens of the last N blocks (DINO: 4 for ViT-S)",
    )
    parser.add_argument(
        "--avgpool",
        action="store_true",
        help="probe also on the mean patch token of the last block (DINO: ViT-B)",
    )


def run(args: argparse.Namespace) -> int:
    from pipeline.checkpoints import (
        CONFIG_FILE,
        META_FILE,
        as_local_dir,
        load_config,
        newest_checkpoint_path,
        read_run_file,
    )
    from pipeline.config import ConfigError, DinoConfig, apply_override

    ckpt = args.checkpoint.rstrip("/")
    if read_run_file(ckpt, META_FILE) is None:  # a run directory (local or a URI): its newest
        parent, _, name = ckpt.rpartition("/")  # checkpoint, found by listing, never downloaded
        found = newest_checkpoint_path(parent or ".", name) if name else None
        if found is None:
            raise UsageError(f"no checkpoint at {args.checkpoint}")
        ckpt = found
    if args.config:
        cfg = DinoConfig.load(args.config, args.overrides)
    else:
        with as_local_dir(ckpt) as d:
            if not (Path(d) / CONFIG_FILE).is_file():
                raise ConfigError(f"{ckpt} has no {CONFIG_FILE}; pass --config")
            raw = load_config(d).model_dump(mode="json")
        for item in args.overrides:
            apply_override(raw, item)
        cfg = DinoConfig.from_dict(raw)
    problem = _probe_problem(args, cfg)
    if problem:
        raise UsageError(problem)
    from pipeline.evaluate.knn_eval import evaluate_knn
    from pipeline.ray_runtime import ensure_ray

    ensure_ray(args.address)
    metrics = evaluate_knn(
        cfg,
        ckpt,
        include_random_init=not args.no_random_init,
        include_pixels=not args.no_pixels,
        linear=args.linear,
        n_last_blocks=args.n_last_blocks,
        avgpool=args.avgpool,
    )
    if not metrics:
        raise UsageError("no labelled evaluation data (set eval.train_path/val_path)")
    print(summary_table(metrics, cfg.eval.headline_k), file=sys.stderr)
    print(json.dumps({"checkpoint": ckpt, **metrics}, indent=1))
    return 0


def _probe_problem(args: argparse.Namespace, cfg) -> str | None:
    """Why the probe options cannot run (checked before Ray starts), or None."""
    from dino_model.backbone import is_vit

    if args.n_last_blocks < 1:
        return f"--n-last-blocks {args.n_last_blocks}: must be >= 1"
    official = args.n_last_blocks != 1 or args.avgpool
    if official and not args.linear:
        return "--n-last-blocks/--avgpool set the linear probe's features: add --linear"
    if official and not is_vit(cfg.model.arch):
        return (
            f"--n-last-blocks/--avgpool need a ViT backbone (model.arch={cfg.model.arch!r}): "
            "drop them to probe the pooled feature"
        )
    return None


def summary_table(metrics: dict, headline_k: int) -> str:
    """Rows trained / random init / raw pixels; columns k-NN top-1 at headline_k and, when
    present, linear-probe top-1 (percent)."""
    linear = any(k.startswith("linear_") and k.endswith("_top1") for k in metrics)
    lines = [
        f"{'features':<12} {f'k-NN@{headline_k} top-1':>16}"
        + (f" {'linear top-1':>13}" if linear else "")
    ]
    for name, suffix in (("trained", ""), ("random init", "_init"), ("raw pixels", "_pixels")):
        knn = metrics.get(f"knn{suffix}_top1")
        if knn is None:
            continue
        row = f"{name:<12} {knn:>15.2f}%"
        if linear:
            row += f" {metrics.get(f'linear{suffix}_top1', float('nan')):>12.2f}%"
        lines.append(row)
    return "\n".join(lines)
