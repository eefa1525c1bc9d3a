"""The Tune function trainable: one trial = one DINO training run (a ``TorchTrainer``).

``run_training`` hands every epoch's rank-0 metrics to ``on_epoch_metrics`` on the trial's own
thread, where we ``ray.tune.report`` them, so ``ASHAScheduler`` sees the in-training k-NN per epoch
(``subset_knn_top1`` on ``eval.in_training_limit`` validation images; ``eval.every_epochs`` is
forced to 1) and can stop weak trials early. The trial's last report carries the end-of-run
``knn_top1`` on the whole validation split (``eval.at_end`` is forced on): the sweep selects on
that one. Trials never see the test split (``eval.test_path`` is cleared): the sweep reports it
once, for the best trial.
"""

from __future__ import annotations

from typing import Any

import ray.tune

from pipeline.config import DinoConfig
from pipeline.train.knn import in_training_name
from pipeline.training_run import run_training
from pipeline.tune.space import trial_overrides


def trial_config(
    base: dict[str, Any], params: dict[str, Any], trial_name: str, storage_path: str
) -> DinoConfig:
    cfg = DinoConfig.from_dict(base)
    updates = trial_overrides(params)
    updates.update(
        {
            "train.name": trial_name,
            "train.storage_path": storage_path,
            "eval.every_epochs": 1,  # ASHA stops trials on the per-epoch in-training k-NN
            "eval.at_end": True,  # the sweep selects on the whole validation split
            "eval.test_path": None,  # selection never sees the test split
            "tracking.run_name": trial_name,
        }
    )
    return cfg.with_overrides(updates)


def train_trial(
    params: dict[str, Any], base: dict[str, Any] | None = None, storage: str | None = None
) -> None:
    """Tune function trainable: one DINO training run (a TorchTrainer) per trial. ``base`` and
    ``storage`` (``tune.with_parameters``) are the real base config and storage path; the
    ``_base``/``_storage`` in ``params`` are redacted copies that Tune stores."""
    ctx = ray.tune.get_context()
    name = trial_name(params["_sweep"], ctx.get_trial_id())
    cfg = trial_config(
        params["_base"] if base is None else base,
        params,
        name,
        params["_storage"] if storage is None else storage,
    )
    metric = in_training_name(cfg.tune.metric)  # what ASHA reads at every report
    reported: list[dict] = []

    def on_epoch(m: dict[str, Any]) -> None:
        row = {
            k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        row["epoch"] = int(m.get("epoch", len(reported))) + 1  # training_iteration-like, from 1
        if metric not in row:
            return  # no eval this epoch: nothing ASHA can use
        reported.append(row)
        ray.tune.report(row)

    result = run_training(cfg, on_epoch_metrics=on_epoch)
    final = {
        k: v
        for k, v in result.metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    final.update(
        {
            "checkpoint_path": result.checkpoint_path or "",
            "mlflow_run_id": result.mlflow_run_id or "",
            "final": 1,
        }
    )
    if metric in final:
        final["epoch"] = (reported[-1]["epoch"] + 1) if reported else 1
        ray.tune.report(final)  # the last statement: ASHA may end the trial right here


def trial_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-t{trial_id}"
