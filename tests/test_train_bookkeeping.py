"""Training-loop bookkeeping that needs no cluster: which checkpoint a restart resumes from, the
epoch meter's wall-clock fractions, and how the batch stream
opens its executions."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from presets import tiny_config
from ray.train import Checkpoint

from pipeline.checkpoints import build_models, save_checkpoint
from pipeline.train.metrics import EpochMeter
from pipeline.train.resume_point import resume_state
from pipeline.train.stream import BatchStream


def _save(run: Path, step: int, cfg) -> Path:
    student, teacher = build_models(cfg, seed=step)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    return save_checkpoint(
        run / f"checkpoint_step_{step:08d}",
        student=student,
        teacher=teacher,
        center=torch.full((1, cfg.model.out_dim), float(step)),
        optimizer=opt,
        epoch=step // 2,
        global_step=step,
        iters_per_epoch=2,
        cfg=cfg,
    )


def test_restart_takes_the_newest_complete_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "runs", "r")
    run = tmp_path / "runs" / "r"
    registered = _save(run, 2, cfg)
    # a checkpoint persisted after the one Ray Train registered (the worker died right after)
    _save(run, 4, cfg)
    state, source = resume_state(
        Checkpoint.from_directory(str(registered)), str(tmp_path / "runs"), "r"
    )
    assert state["global_step"] == 4 and source.endswith("checkpoint_step_00000004")
    assert float(state["center"][0, 0]) == 4.0

    # an unreadable newer copy (interrupted upload) falls back to Ray Train's checkpoint
    (run / "checkpoint_step_00000004" / "state.pt").write_bytes(b"truncated")
    state, source = resume_state(
        Checkpoint.from_directory(str(registered)), str(tmp_path / "runs"), "r"
    )
    assert state["global_step"] == 2

    # nothing registered (first attempt died before the controller saw any report)
    _save(run, 6, cfg)
    state, _ = resume_state(None, str(tmp_path / "runs"), "r")
    assert state["global_step"] == 6
    assert resume_state(None, str(tmp_path / "runs"), "other") == (None, None)


def test_a_checkpoint_still_being_copied_is_never_the_newest(tmp_path):
    """Ray Train persists a checkpoint file by file: a reader that lists the run directory
    mid-copy sees a growing state.pt or no meta.json yet, and takes the newest whole one."""
    import json
    import shutil

    from pipeline.checkpoints import (
        META_FILE,
        STATE_FILE,
        newest_checkpoint,
        newest_checkpoint_path,
    )

    cfg = tiny_config(tmp_path, tmp_path / "runs", "c")
    run = tmp_path / "runs" / "c"
    whole = _save(run, 4, cfg)
    growing = _save(run, 6, cfg)  # meta.json copied first, state.pt half way
    data = (growing / STATE_FILE).read_bytes()
    (growing / STATE_FILE).write_bytes(data[: len(data) // 2])
    no_meta = _save(run, 8, cfg)  # every file but meta.json copied
    (no_meta / META_FILE).unlink()
    assert newest_checkpoint(str(tmp_path / "runs"), "c") == (4, str(whole))
    assert newest_checkpoint_path(str(tmp_path / "runs"), "c") == str(whole)
    state, _ = resume_state(None, str(tmp_path / "runs"), "c")  # not a fresh start
    assert state["global_step"] == 4

    # a checkpoint written before meta.json held file sizes still counts when state.pt is there
    shutil.rmtree(no_meta)
    meta = json.loads((growing / META_FILE).read_text())
    del meta["file_sizes"]
    (growing / META_FILE).write_text(json.dumps(meta))
    (growing / STATE_FILE).write_bytes(data)
    assert newest_checkpoint(str(tmp_path / "runs"), "c") == (6, str(growing))


def test_epoch_meter_counts_time_outside_wait_and_compute():
    meter = EpochMeter()
    meter.add({"loss": 2.0}, images=8, wait_s=0.0, compute_s=0.0)
    time.sleep(0.2)
    meter.add({"loss": 4.0}, images=8, wait_s=0.05, compute_s=0.05)
    meter.report_s = 0.05
    s = meter.summary(world_size=2)
    assert s["epoch_loss"] == 3.0 and s["epoch_steps"] == 2
    assert s["epoch_wall_s"] >= 0.2
    assert abs(s["epoch_images_per_s"] - 32 / s["epoch_wall_s"]) < 1e-6
    assert s["epoch_data_wait_fraction"] < 0.3 and s["epoch_sync_fraction"] > 0.4
    total = s["epoch_data_wait_fraction"] + s["epoch_compute_fraction"] + s["epoch_sync_fraction"]
    assert abs(total - 1.0) < 1e-6


def test_the_stream_opens_a_new_execution_where_each_window_ends():
    """A dataset that bounds its windows (``data.stream_rows``): the loop opens the next
    execution at the epoch the last one ended before, and not in between."""
    opened: list[tuple[int, int]] = []

    class Windowed:  # EpochStreaming with windows of 2 epochs
        streams_epochs = True
        dataset = None
        num_images = 8

        def set_epoch(self, epoch, until=None, rows_per_epoch=None):
            end = min(until, epoch + 2)
            opened.append((epoch, end))
            return end

    class Shard:
        def iter_torch_batches(self, **kwargs):
            return iter([{"epoch": len(opened) - 1}])

    cfg = tiny_config("unused", "unused", "w", train__epochs=5)
    stream = BatchStream(Windowed(), Shard(), cfg, rows_per_epoch=8)
    for epoch in range(5):
        stream.begin_epoch(epoch)
    assert opened == [(0, 2), (2, 4), (4, 5)]


def test_the_first_batch_is_fetched_in_the_background_and_handed_over_once():
    """``BatchStream.start``: the first batch is fetched on a thread while the worker builds its
    networks; ``next`` returns it, then the rest of the stream; opening the started epoch again
    does nothing; an error while fetching it reaches the caller of ``next``."""
    import threading

    release = threading.Event()
    fetched_on: list[str] = []

    class PerEpoch:  # a dataset with one execution per epoch
        dataset = None
        num_images = 8

    class Shard:
        def __init__(self):
            self.opened = 0

        def iter_torch_batches(self, **kwargs):
            self.opened += 1

            def batches():
                release.wait(10)  # held until the "networks are built"
                fetched_on.append(threading.current_thread().name)
                yield {"i": 0}
                yield {"i": 1}

            return batches()

    cfg = tiny_config("unused", "unused", "w", train__epochs=2)
    shard = Shard()
    stream = BatchStream(PerEpoch(), shard, cfg, rows_per_epoch=8)
    stream.start(0)
    assert shard.opened == 1 and not fetched_on  # started, not waited for
    release.set()
    stream.begin_epoch(0)  # the loop's own call for the started epoch
    assert shard.opened == 1
    assert [stream.next(), stream.next(), stream.next()] == [{"i": 0}, {"i": 1}, None]
    assert fetched_on[0].startswith("dino-ray-first-batch")
    stream.begin_epoch(1)
    assert shard.opened == 2

    class Broken(Shard):
        def iter_torch_batches(self, **kwargs):
            def batches():
                raise OSError("bucket unreachable")
                yield

            return batches()

    stream = BatchStream(PerEpoch(), Broken(), cfg, rows_per_epoch=8)
    stream.start(0)
    with pytest.raises(OSError, match="bucket unreachable"):
        stream.next()
