"""A driver killed during the final evaluation (issue 22 #11): the rerun finishes the run (the
evaluation, the figures, the MLflow run) without training, and the run is refused after that."""

from __future__ import annotations

import pytest
from presets import tiny_config

from dino_model.optim import build_optimizer
from pipeline.checkpoints import build_models, read_run_file, run_dir, save_checkpoint
from pipeline.preflight import PreflightError
from pipeline.train.rerun import FINISHED_FILE
from pipeline.train.trainer import fit

pytestmark = pytest.mark.ray


class RecordingEvaluation:
    """A ``FinalEvaluation`` that records the checkpoints it was asked about."""

    def __init__(self) -> None:
        self.evaluated: list[str] = []

    def knn(self, cfg, checkpoint_path):
        self.evaluated.append(checkpoint_path)
        return {"knn_top1": 51.0, "knn_init_top1": 37.0}

    def test_split(self, cfg, checkpoint_path):
        return {}


def test_a_trained_run_whose_evaluation_never_ran_is_finished_by_the_rerun(
    ray_session, digits_dir, tmp_path
):
    cfg = tiny_config(digits_dir, tmp_path / "runs", "cut", eval__at_end=True, eval__every_epochs=0)
    epochs, ipe = cfg.train.epochs, cfg.train.max_steps_per_epoch
    # what a driver killed after the last epoch's checkpoint leaves: a whole final checkpoint,
    # no end-of-run figures, no finished mark
    student, teacher = build_models(cfg, seed=0)
    last = tmp_path / "runs" / "cut" / f"checkpoint_step_{epochs * ipe:08d}"
    save_checkpoint(
        last,
        student=student,
        teacher=teacher,
        center=teacher.head.last_layer.weight.new_zeros(1, cfg.model.out_dim),
        optimizer=build_optimizer(student, cfg.optim.optimizer),
        epoch=epochs,
        global_step=epochs * ipe,
        iters_per_epoch=ipe,
        cfg=cfg,
        metrics={"epoch_loss": 5.0, "step": epochs * ipe},
    )
    evaluation = RecordingEvaluation()
    result = fit(cfg, evaluation=evaluation)

    assert evaluation.evaluated == [str(last)]  # evaluated, not trained again
    assert result.checkpoint_path == str(last)
    assert result.metrics["knn_top1"] == 51.0 and result.metrics["knn_gain_top1"] == 14.0
    assert result.metrics["epoch_loss"] == 5.0  # the figures the checkpoint carried
    assert read_run_file(run_dir(str(tmp_path / "runs"), "cut"), FINISHED_FILE)
    with pytest.raises(PreflightError, match=r"already finished 2 epochs"):
        fit(cfg, evaluation=evaluation)
