"""Hyper-parameter sweeps: Ray Tune over DINO training, in the Ray Train V2 pattern.

``Tuner(train_trial)`` runs one function trainable per trial (``pipeline.tune.trainable``), each
building a ``TorchTrainer``; ``ASHAScheduler`` stops weak trials on the per-epoch in-training k-NN
(``subset_<tune.metric>``, on ``eval.in_training_limit`` validation images) and the sweep picks
the best finished trial on ``tune.metric`` at the end of the run, on the whole validation split
(carved out of the training data when ``eval.val_path`` is unset, and excluded from SSL
training). The test split
(``eval.test_path``) is evaluated once, for the best trial, after the selection.

MLflow: one parent run for the sweep (``pipeline.tune.parent_run``); each trial's training run
nests under it. At the end the parent run gets the results table (CSV), a plot and the best
trial's figures, and the best trial's teacher is registered (alias ``champion`` if it beats the
registered ones).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from pipeline.checkpoints import resolve_storage_path
from pipeline.config import DinoConfig
from pipeline.evaluate.knn_eval import evaluate_test_split
from pipeline.preflight import absolute_local_paths
from pipeline.ray_runtime import ensure_ray
from pipeline.redact import redact, redact_obj
from pipeline.registry.register import register_teacher
from pipeline.train.knn import in_training_name
from pipeline.tune.parent_run import ParentRun
from pipeline.tune.placement import ReleaseTrialPlacementGroups
from pipeline.tune.report import best_row, format_table, results_table, write_markdown
from pipeline.tune.space import (
    DRIVER_RESOURCES,
    concurrent_trials,
    param_space,
    total_trials,
    trial_cpus,
    trial_overrides,
)
from pipeline.tune.trainable import train_trial


@dataclass
class SweepResult:
    table: list[dict[str, Any]]  # one row per trial
    best: dict[str, Any] | None  # the best row
    parent_run_id: str | None
    registered_version: int | None
    csv_path: str | None = None
    plot_path: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] = field(default_factory=dict)  # the best trial on eval.test_path


def run_sweep(
    cfg: DinoConfig,
    *,
    address: str | None = None,
    register: bool = True,
    name: str | None = None,
    results_dir: str | None = None,
) -> SweepResult:
    ensure_ray(address)
    tc = cfg.tune
    sweep = name or f"{cfg.train.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = resolve_storage_path(cfg.train.storage_path)
    space = param_space(cfg)
    concurrency = concurrent_trials(cfg)
    print(
        f"sweep {sweep}: {total_trials(cfg)} trial(s), {concurrency} at a time "
        f"({trial_cpus(cfg):g} CPU each of {ray.cluster_resources().get('CPU', 0):g}); "
        f"searching {', '.join(space)}",
        flush=True,
    )

    parent = ParentRun(cfg, sweep)
    # trials start in their own directory: relative data paths are made absolute here
    base = absolute_local_paths(cfg).model_dump(mode="json")
    # Tune writes the param space into the sweep's storage (experiment state, every trial's
    # params.json/params.pkl and result.json): it holds the base config redacted, for people;
    # the trials get the real one (and the real storage path) through the object store
    space.update(
        {
            "_base": redact_obj(base),
            "_sweep": sweep,
            "_storage": redact(storage),
            "_parent_run_id": parent.run_id,
        }
    )
    # max_t above the last report (epochs + the final one), so only the rungs stop trials
    # ASHA reads the in-training (subset) figure every epoch; the selection (best_row) reads the
    # end-of-run figure on the whole split, so the scheduler holds its own metric
    scheduler = ASHAScheduler(
        metric=in_training_name(tc.metric),
        mode=tc.mode,
        time_attr="epoch",
        max_t=cfg.train.epochs + 2,
        grace_period=tc.grace_period,
        reduction_factor=tc.reduction_factor,
    )
    tuner = tune.Tuner(
        # the trial is only the Train driver (it waits); the TorchTrainer workers and the data
        # actors it starts reserve the real CPUs/GPUs
        tune.with_resources(
            tune.with_parameters(train_trial, base=base, storage=storage), dict(DRIVER_RESOURCES)
        ),
        param_space=space,
        tune_config=tune.TuneConfig(
            scheduler=scheduler,
            num_samples=tc.num_samples,
            max_concurrent_trials=concurrency,
        ),
        # verbose=0: Tune's status table repeats the whole base config every few seconds; the
        # results table printed at the end (format_table, below) is the one to read
        run_config=tune.RunConfig(
            name=sweep,
            storage_path=storage,
            verbose=0,
            callbacks=[ReleaseTrialPlacementGroups(DRIVER_RESOURCES)],
        ),
    )
    grid = tuner.fit()
    table = results_table(grid, cfg)
    parent.adopt_children(table, sweep, cfg)
    best = best_row(table, tc.metric, tc.mode)
    test = report_test_once(cfg, best)
    csv_path, plot_path = parent.log_results(table, best, cfg)
    parent.log_metrics(test)
    if results_dir:
        keep_results(results_dir, sweep, table, cfg, best, test, csv_path, plot_path)
    print(format_table(table, cfg), flush=True)
    version = None
    if (
        register
        and tc.register_best
        and best is not None
        and best.get("checkpoint_path")
        and cfg.tracking.enabled
    ):
        version = register_teacher(
            best["checkpoint_path"],
            None,
            # validation figures only on the trial's run: the champion is chosen on run
            # metrics, and the test split must never take part in a choice
            metrics={k: best[k] for k in best if k.startswith("knn")},
            run_id=best.get("mlflow_run_id") or None,
            tracking_uri=cfg.tracking.tracking_uri,
            name=cfg.tracking.registered_model,
            set_champion=True,
            extra_tags={
                "sweep": sweep,
                "trial_id": str(best["trial_id"]),
                **{k: f"{float(v):.6g}" for k, v in test.items() if isinstance(v, (int, float))},
            },
        )
        print(
            f"registered best trial {best['trial_id']} as {cfg.tracking.registered_model} "
            f"version {version}",
            flush=True,
        )
        parent.set_tag("registered_version", str(version))
    parent.finish("FINISHED" if best is not None else "FAILED")
    return SweepResult(table, best, parent.run_id, version, csv_path, plot_path, test=test)


def keep_results(
    results_dir: str,
    sweep: str,
    table,
    cfg: DinoConfig,
    best,
    test,
    csv_path: str | None,
    plot_path: str | None,
) -> None:
    """Copy the CSV and plot to ``results_dir`` and write the Markdown table beside them
    (``<sweep>.csv``, ``<sweep>.png``, ``<sweep>.md``)."""
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    for src, suffix in ((csv_path, ".csv"), (plot_path, ".png")):
        if src:
            shutil.copyfile(src, out / f"{sweep}{suffix}")
    write_markdown(table, cfg, out / f"{sweep}.md", best, test, title=f"Sweep {sweep}")
    print(f"results: {out / sweep}.{{csv,png,md}}", flush=True)


def report_test_once(cfg: DinoConfig, best: dict[str, Any] | None) -> dict[str, Any]:
    """The best trial's teacher on ``eval.test_path``, after the selection (which saw only the
    validation split); its ``test_*`` figures are added to the best row. Empty without a test
    split or a finished best trial."""
    if cfg.eval.test_path is None or best is None or not best.get("checkpoint_path"):
        return {}
    best_cfg = cfg.with_overrides(
        trial_overrides({k: best[k] for k in cfg.tune.search_space if k in best})
    )
    test = evaluate_test_split(best_cfg, best["checkpoint_path"])
    best.update(test)
    print(
        f"best trial {best['trial_id']} on the test split (reported once, never used to "
        f"select): k-NN top-1 {test.get('test_knn_top1', float('nan')):.2f} "
        f"(random init {test.get('test_knn_init_top1', float('nan')):.2f}, "
        f"raw pixels {test.get('test_knn_pixels_top1', float('nan')):.2f})",
        flush=True,
    )
    return test
