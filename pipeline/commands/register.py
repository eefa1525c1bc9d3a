"""`dino-ray register`: register a checkpoint's teacher backbone in the MLflow model registry.

    dino-ray register --checkpoint runs/dino/checkpoint_000003 [--config cfg.yaml] [overrides]
    dino-ray register --run-name dino [--config cfg.yaml] [overrides]

``--run-name`` finds the newest MLflow run of that name in ``tracking.experiment``: its metrics
(knn_top1 ...) become tags, the model is logged into that run, and the checkpoint is the run's
``checkpoint_path`` tag/param or else the newest one under ``train.storage_path/NAME``.
``--checkpoint`` logs into a new run, with the checkpoint's k-NN metrics as run metrics. Either
way the run keeps the ``eval_key`` param and metrics that ``champion`` / ``champion-<eval_key>``
are decided on (``pipeline.registry.champion``).
"""

from __future__ import annotations

import argparse

from pipeline.commands import CommandFailed, UsageError, add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory or URI")
    src.add_argument("--run-name", help="MLflow run name (= train.name by default)")
    parser.add_argument("--name", help="registered model name (default tracking.registered_model)")
    parser.add_argument("--tracking-uri", help="MLflow URI (default tracking.tracking_uri)")
    parser.add_argument("--alias", action="append", default=[], help="extra alias(es) to set")
    parser.add_argument(
        "--no-champion",
        action="store_true",
        help="do not move the 'champion' / 'champion-<eval_key>' aliases",
    )
    add_config_arguments(parser)


def find_run(tracking_uri: str, experiment: str, run_name: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"attributes.run_name = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def final_figures(checkpoint: str) -> dict:
    """The end-of-run figures the run recorded (``finished.json``) when ``checkpoint`` is the
    checkpoint it finished on; {} otherwise."""
    import json

    from pipeline.checkpoints import read_run_file
    from pipeline.train.rerun import FINISHED_FILE

    path = str(checkpoint).rstrip("/")
    text = read_run_file(path.rsplit("/", 1)[0], FINISHED_FILE) if "/" in path else None
    if not text:
        return {}
    finished = json.loads(text)
    same = str(finished.get("checkpoint") or "").rstrip("/") == path
    return dict(finished.get("metrics") or {}) if same else {}


def figure_words(metrics: dict) -> str:
    """What the printed line says of the version's figure and the set it was measured on."""
    if "knn_top1" in metrics:
        val = metrics.get("knn_val_size")
        on = f", {int(val):,} images" if val else ""
        return f"knn_top1={metrics['knn_top1']:.2f} on the whole validation split{on}"
    if "subset_knn_top1" in metrics:
        return (
            f"no end-of-run knn_top1, not comparable for champion: the checkpoint has only the "
            f"in-training subset_knn_top1={metrics['subset_knn_top1']:.2f} on "
            f"{int(metrics.get('subset_knn_val_size', 0)):,} validation images; run "
            "`dino-ray evaluate` on it for the whole split"
        )
    return "knn_top1=n/a"


def run(args: argparse.Namespace) -> int:
    from pipeline.config import DinoConfig
    from pipeline.registry.register import EvalKeyConflictError, register_teacher

    cfg = DinoConfig.load(args.config, args.overrides) if (args.config or args.overrides) else None
    tracking_uri = args.tracking_uri or (cfg.tracking.tracking_uri if cfg else None)
    metrics: dict = {}
    run_id = None
    checkpoint = args.checkpoint
    if args.run_name:
        base = cfg or DinoConfig()
        tracking_uri = tracking_uri or base.tracking.tracking_uri
        found = find_run(tracking_uri, base.tracking.experiment, args.run_name)
        if found is None:
            raise CommandFailed(
                f"no MLflow run named {args.run_name!r} in experiment "
                f"{base.tracking.experiment!r} at {tracking_uri}"
            )
        run_id = found.info.run_id
        metrics = dict(found.data.metrics)
        checkpoint = found.data.tags.get("checkpoint_path") or found.data.params.get(
            "checkpoint_path"
        )
        if not checkpoint:
            from pipeline.checkpoints import newest_checkpoint_path

            checkpoint = newest_checkpoint_path(base.train.storage_path, args.run_name)
        if not checkpoint:
            raise CommandFailed(
                f"run {args.run_name!r} has no checkpoint under {base.train.storage_path}"
            )
    import yaml

    from pipeline.checkpoints import CONFIG_FILE, read_meta, read_run_file

    saved = read_run_file(checkpoint, CONFIG_FILE)
    if saved is None:
        raise UsageError(f"no checkpoint at {checkpoint} (no {CONFIG_FILE} there)")
    ckpt_cfg = DinoConfig.from_dict(yaml.safe_load(saved))
    # the run's end-of-run figures when this is the checkpoint it finished on, else the
    # checkpoint's own (local or s3://, gs://: only its in-training subset_knn_*), unless the
    # MLflow run's are used
    metrics = metrics or final_figures(checkpoint) or read_meta(checkpoint).get("metrics", {})
    use_cfg = ckpt_cfg
    if cfg is not None:  # tracking/registry settings from the command line win
        use_cfg = ckpt_cfg.with_overrides(
            {"tracking." + k: v for k, v in cfg.tracking.model_dump().items()}
        )
    try:
        version = register_teacher(
            checkpoint,  # its epoch and figures are read with it (meta.json)
            use_cfg,
            metrics=metrics,
            run_id=run_id,
            tracking_uri=tracking_uri or use_cfg.tracking.tracking_uri,
            name=args.name or use_cfg.tracking.registered_model,
            set_champion=not args.no_champion,
            aliases=args.alias,
        )
    except EvalKeyConflictError as exc:
        raise CommandFailed(str(exc)) from exc
    name = args.name or use_cfg.tracking.registered_model
    print(f"registered {name} version {version} ({figure_words(metrics)})")
    print(f"load it with: dino-ray models pull models:/{name}/{version} DIR")
    return 0
