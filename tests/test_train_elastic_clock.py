"""Elastic runs, counted in images (issue 23): the schedules at an image count do not depend on
the world size, a fixed-size run trains as before, checkpoints resume at any size (no Ray)."""

from __future__ import annotations

import math

import pytest
import torch

from dino_model.image_clock import ImageClock
from dino_model.schedules import build_schedules, scaled_lr
from pipeline.checkpoints import save_checkpoint
from pipeline.config import ConfigError, DinoConfig
from pipeline.train.elastic import checkpoint_layout, resume_step, run_clock
from pipeline.train.rerun import check_rerun, resumable_step
from pipeline.train.worker_state import run_schedules

# a run whose every schedule moves: warm-ups, freeze, teacher temperature ramp; 100 images do
# not divide into global batches of 8 (a remainder is dropped) and max_steps_per_epoch is unset
RUN = {
    "train.name": "elastic",
    "train.epochs": 6,
    "train.batch_size_per_worker": 4,
    "optim.lr": 1e-3,
    "optim.min_lr": 1e-5,
    "optim.warmup_epochs": 2,
    "optim.freeze_last_layer_epochs": 1,
    "optim.momentum_teacher": 0.99,
    "loss.warmup_teacher_temp_epochs": 3,
    "loss.warmup_teacher_temp": 0.04,
    "loss.teacher_temp": 0.07,
}
NUM_IMAGES = 100


def _cfg(**updates) -> DinoConfig:
    return DinoConfig().with_overrides({**RUN, **updates})


def _values(schedules, step: int) -> dict:
    s = schedules.at(step)
    return dict(
        wd=s.weight_decay,
        momentum=s.momentum_teacher,
        temp=s.teacher_temp,
        freeze=s.freeze_last_layer,
    )


@pytest.mark.parametrize("rule,ratio", [("linear", 0.5), ("sqrt", math.sqrt(0.5))])
def test_schedules_at_the_same_image_count_are_equal_for_1_and_2_workers(rule, ratio):
    cfg = _cfg(**{"train.num_workers": 2, "optim.lr_scaling": rule})
    two = run_schedules(cfg, run_clock(cfg, NUM_IMAGES, 2))
    one = run_schedules(cfg, run_clock(cfg, NUM_IMAGES, 1))
    c1, c2 = one.clock, two.clock
    assert c1.epoch_images == c2.epoch_images == 96  # 12 steps of 8 / 24 steps of 4
    assert c1.iters_per_epoch == 2 * c2.iters_per_epoch
    total2 = cfg.train.epochs * c2.iters_per_epoch
    for step2 in range(total2):
        images = c2.images_at(step2)
        step1 = c1.step_at(images)
        assert c1.images_at(step1) == images
        assert _values(one, step1) == _values(two, step2), (step1, step2)
        assert one.at(step1).lr == pytest.approx(two.at(step2).lr * ratio, rel=1e-12)
    # the warm-up, the freeze and the temperature ramp end at the same image count
    frozen1 = [c1.images_at(s) for s in range(total2 * 2) if one.at(s).freeze_last_layer]
    frozen2 = [c2.images_at(s) for s in range(total2) if two.at(s).freeze_last_layer]
    assert max(frozen1) // 96 == max(frozen2) // 96 == 0


def test_a_fixed_size_run_reads_the_per_step_schedules_it_always_had():
    cfg = _cfg(**{"train.num_workers": 2})
    s = run_schedules(cfg, run_clock(cfg, NUM_IMAGES, 2))
    ipe = NUM_IMAGES // 8
    o, loss = cfg.optim, cfg.loss
    before = build_schedules(
        lr=scaled_lr(o.lr, 8),
        min_lr=o.min_lr,
        warmup_epochs=o.warmup_epochs,
        weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end,
        momentum_teacher=o.momentum_teacher,
        momentum_teacher_end=o.momentum_teacher_end,
        warmup_teacher_temp=loss.warmup_teacher_temp,
        teacher_temp=loss.teacher_temp,
        warmup_teacher_temp_epochs=loss.warmup_teacher_temp_epochs,
        freeze_last_layer_epochs=o.freeze_last_layer_epochs,
        epochs=cfg.train.epochs,
        iters_per_epoch=ipe,
    )
    assert s.iters_per_epoch == ipe
    for step in range(before.total):
        assert s.at(step) == before.at(step)  # bit for bit
        assert s.clock.run_step(step) == step


def test_a_run_resized_mid_way_ends_its_schedule_at_the_same_image_count():
    cfg = _cfg(**{"train.num_workers": 2})
    two = run_schedules(cfg, run_clock(cfg, NUM_IMAGES, 2))
    # two epochs on 2 workers, a checkpoint, the rest on 1 worker
    c2 = two.clock
    saved = {"global_step": c2.run_step(2 * c2.iters_per_epoch), **c2.position(2 * 12)}
    one = run_schedules(cfg, run_clock(cfg, NUM_IMAGES, 1, saved))
    c1 = one.clock
    start = resume_step(saved, c1)
    assert start == 2 * c1.iters_per_epoch  # epoch 2, step 0 at the new size
    end1 = cfg.train.epochs * c1.iters_per_epoch
    end2 = cfg.train.epochs * c2.iters_per_epoch
    assert c1.images_at(end1) == c2.images_at(end2) == cfg.train.epochs * 96
    assert c1.run_step(end1) == end2
    assert one.at(end1 - 1).momentum_teacher == two.at(end2 - 1).momentum_teacher


def test_a_mid_epoch_resume_at_another_size_trains_no_image_twice():
    big = ImageClock(epoch_images=96, ref_batch=12, global_batch=12)  # 3 workers of 4
    small = ImageClock(epoch_images=96, ref_batch=12, global_batch=8)  # 2 of them left
    for step in range(3 * big.iters_per_epoch):
        seen = big.images_at(step)
        resumed = small.step_at(seen)
        assert small.images_at(resumed) >= seen  # nothing trained twice
        epoch_end = (seen // 96 + 1) * 96
        assert small.images_at(resumed) - seen < 8 or small.images_at(resumed) == epoch_end


def test_lr_scaling_is_checked_with_the_field_named():
    with pytest.raises(ConfigError, match="optim.lr_scaling"):
        _cfg(**{"optim.lr_scaling": "cubic"})


def test_a_checkpoint_resumes_at_another_worker_count(tmp_path):
    """The rerun check compares what defines the run: a checkpoint of 2 workers continues on 1,
    at the same image count (before, its 12 iterations per epoch refused the 24 of 1 worker)."""
    cfg2 = _cfg(**{"train.num_workers": 2, "train.storage_path": str(tmp_path)})
    clock = run_clock(cfg2, NUM_IMAGES, 2)
    student, teacher = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    step = 3 * clock.iters_per_epoch
    save_checkpoint(
        tmp_path / "elastic" / f"checkpoint_step_{step:08d}",
        student=student,
        teacher=teacher,
        center=torch.zeros(1),
        optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
        epoch=3,
        global_step=clock.run_step(step),
        iters_per_epoch=clock.ref_iters_per_epoch,
        cfg=cfg2,
        position=clock.position(step),
    )
    cfg1 = cfg2.with_overrides({"train.num_workers": 1})
    assert check_rerun(cfg1, cfg2.to_yaml(redact=True)) == (cfg1, False)
    layout = checkpoint_layout(str(tmp_path), "elastic")
    ref = run_clock(cfg1, NUM_IMAGES, 1, layout)
    assert resumable_step(cfg1, str(tmp_path), ref.ref_iters_per_epoch) == step
    assert ref.epoch_images == 96 and ref.ref_batch == 8  # the run's, not 1 worker's
