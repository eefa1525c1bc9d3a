"""The headline k-NN is the end-of-run figure on the whole validation split, never the last
epoch's in-training figure on its bounded subset (issue 22 #4): the two are named apart, the
end-of-run evaluation always runs, and every line and record says which set a figure is on."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from presets import tiny_config

from pipeline.checkpoints import build_models, read_run_file
from pipeline.registry.eval_key import eval_identity, eval_key
from pipeline.tracking import Tracker
from pipeline.train.collector import MetricsCollector
from pipeline.train.finish import finish_run
from pipeline.train.knn import InTrainingKnn
from pipeline.train.plan import RunPlan
from pipeline.train.progress import Progress
from pipeline.train.rerun import FINISHED_FILE

FULL = {"knn_top1": 51.0, "knn_init_top1": 37.0, "knn_val_size": 360, "knn_bank_size": 1437}


class RecordingEvaluation:
    """A ``FinalEvaluation`` that records the checkpoints it evaluated (the whole split)."""

    def __init__(self) -> None:
        self.evaluated: list[str] = []

    def knn(self, cfg, checkpoint_path):
        self.evaluated.append(checkpoint_path)
        return dict(FULL)

    def test_split(self, cfg, checkpoint_path):
        return {}


def _eval_arrays(n_bank: int, n_val: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "bank_images": rng.integers(0, 256, (n_bank, 32, 32, 3), dtype=np.uint8),
        "bank_labels": np.arange(n_bank) % 4,
        "val_images": rng.integers(0, 256, (n_val, 32, 32, 3), dtype=np.uint8),
        "val_labels": np.arange(n_val) % 4,
    }


@pytest.mark.ray
def test_the_last_epochs_in_training_knn_never_replaces_the_end_of_run_figure(
    ray_session, tmp_path, caplog
):
    cfg = tiny_config(tmp_path, tmp_path / "runs", "h", eval__at_end=True, eval__every_epochs=1)
    # what rank 0 reports after the last epoch: its k-NN on the bounded in-training subset
    knn = InTrainingKnn(
        cfg,
        torch.device("cpu"),
        ray_session.put(_eval_arrays(40, 20)),
        with_baselines=True,
        metrics_queue=None,
    )
    _, teacher = build_models(cfg, seed=0)
    last_epoch = {"kind": "epoch", "epoch": 1, "step": 6, **knn.evaluate(teacher.backbone, 1)}
    tracker = Tracker(cfg.tracking.tracking_uri, "x", enabled=False)
    collector = MetricsCollector(tracker, Progress(2, 3))
    collector.handle(last_epoch)
    plan = RunPlan(
        storage=str(tmp_path / "runs"),
        run_dir=str(tmp_path / "runs" / "h"),
        train_data=None,
        resources=None,
        epochs=2,
        iters_per_epoch=3,
        start_step=0,
        worker_resources={},
    )
    evaluation = RecordingEvaluation()
    with caplog.at_level(logging.INFO, logger="dino_ray.progress"):
        metrics = finish_run(cfg, plan, tracker, collector, "ckpt-6", evaluation)

    assert evaluation.evaluated == ["ckpt-6"]  # the whole split, though the last epoch had a k-NN
    assert metrics["knn_top1"] == FULL["knn_top1"] and metrics["knn_val_size"] == 360
    assert metrics["knn_gain_top1"] == FULL["knn_top1"] - FULL["knn_init_top1"]
    # the in-training figures are kept, under their own names, with the size of their set
    assert metrics["subset_knn_top1"] == last_epoch["subset_knn_top1"]
    assert metrics["subset_knn_init_top1"] == last_epoch["subset_knn_init_top1"]
    assert metrics["subset_knn_val_size"] == 20 and metrics["subset_knn_bank_size"] == 40
    finished = json.loads(read_run_file(plan.run_dir, FINISHED_FILE))
    assert finished["metrics"]["knn_top1"] == FULL["knn_top1"]
    assert (
        "k-NN top-1 on the validation split (360 images, bank 1,437, k=20): trained 51.00 vs "
        "random init 37.00 (gain +14.00)" in caplog.text
    )


def test_without_an_end_of_run_evaluation_the_headline_says_it_is_a_subset(tmp_path, caplog):
    cfg = tiny_config(tmp_path, tmp_path / "runs", "s", eval__at_end=False)
    tracker = Tracker(cfg.tracking.tracking_uri, "x", enabled=False)
    collector = MetricsCollector(tracker, Progress(2, 3))
    collector.handle(
        {"kind": "epoch", "epoch": 1, "step": 6, "subset_knn_top1": 44.0, "subset_knn_val_size": 20}
    )
    plan = RunPlan(str(tmp_path), str(tmp_path / "s"), None, None, 2, 3, 0, {})
    with caplog.at_level(logging.INFO, logger="dino_ray.progress"):
        metrics = finish_run(cfg, plan, tracker, collector, "ckpt-6", RecordingEvaluation())
    assert "knn_top1" not in metrics  # nothing takes the end-of-run name
    assert (
        "no end-of-run k-NN (eval.at_end=false or it failed): the in-training subset_knn_top1 "
        "44.00 is on a subset of 20 validation images (eval.in_training_limit), not the whole "
        "split" in caplog.text
    )


def test_the_eval_key_covers_the_in_training_limit():
    cfg = tiny_config("/d", "/r", "k")
    other = cfg.with_overrides({"eval.in_training_limit": 500})
    assert eval_key(eval_identity(cfg)) != eval_key(eval_identity(other))
