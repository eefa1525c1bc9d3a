"""`dino-ray tune --config FILE [section.field=value ...]`: a Ray Tune sweep with ASHA.

Searches ``tune.search_space`` (default: loss.teacher_temp, optim.momentum_teacher,
augment.num_local; any ``section.field`` may be added), stops weak trials early on the per-epoch
``tune.metric`` (k-NN top-1), logs each trial as a child MLflow run under one parent run, prints
and logs the results table, and registers the best trial's teacher (alias ``champion``).
"""

from __future__ import annotations

import argparse

from pipeline.commands import CommandFailed, add_address_argument, add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_address_argument(parser)
    parser.add_argument("--name", help="sweep name (default <train.name>-sweep-<time>)")
    parser.add_argument(
        "--results-dir", help="also write <sweep>.csv/.png/.md here (e.g. bench/results)"
    )
    parser.add_argument(
        "--no-register", action="store_true", help="do not register the best trial's teacher"
    )


def run(args: argparse.Namespace) -> int:
    from pipeline.config import DinoConfig
    from pipeline.data.dataset import list_data
    from pipeline.preflight import check_config, check_corpus
    from pipeline.tune.space import param_space

    cfg = DinoConfig.load(args.config, args.overrides)
    param_space(cfg)  # unknown search-space fields fail here
    check_config(cfg)  # before Ray: arch, precision, then the corpus
    check_corpus(cfg, list_data(cfg.data).num_images)
    from pipeline.console import setup_console

    setup_console()
    from pipeline.tune.sweep import run_sweep

    result = run_sweep(
        cfg,
        address=args.address,
        register=not args.no_register,
        name=args.name,
        results_dir=args.results_dir,
    )
    if result.best is None:
        raise CommandFailed("no trial finished")
    print(
        f"best trial {result.best['trial_id']}: {cfg.tune.metric}="
        f"{result.best[cfg.tune.metric]:.4f}; results: {result.csv_path}"
    )
    return 0
