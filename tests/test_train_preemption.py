"""A preemption notice (issue 23) on the shared local Ray: an elastic run ``[1, 2]`` checkpoints at
the step of the notice, the noticed worker ends, and the run restarts from that checkpoint with
one worker, counted as a preemption (``train.max_failures=0``: a failure would end the run); the
epoch resized in its middle trains each of its images once. Tiny ViT."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from fault_injection import inject_preemption
from presets import tiny_config

from pipeline.checkpoints import read_meta
from pipeline.train.trainer import fit

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1800)]


def test_a_preemption_notice_checkpoints_at_once_and_the_restart_is_not_a_failure(
    ray_session, digits_dir, tmp_path, mlflow_sqlite, monkeypatch, caplog, capfd
):
    uri = mlflow_sqlite(tmp_path / "mlflow.db")
    cfg = tiny_config(
        digits_dir,
        tmp_path / "runs",
        "spot",
        train__num_workers=[1, 2],
        train__max_failures=0,
        tracking__enabled=True,
        tracking__tracking_uri=uri,
        # blocks of 32 rows to batches of 16: the split hands each worker whole blocks, so
        # the images trained by a step are not the stream's first ones (as on a real run)
        data__map_batch_size=32,
    )  # 2 epochs x 3 steps of 32 images on 2 workers
    caplog.set_level(logging.WARNING, logger="dino_ray.train")
    # the third step of epoch 1; the restart gets one worker (the node is gone)
    inject_preemption(monkeypatch, notice_at_step=5, restart_workers=1)
    result = fit(cfg)

    # the notice's checkpoint: step 5, mid-epoch, written before the worker ended
    run_dir = Path(result.run_dir)
    at_notice = run_dir / "checkpoint_step_00000005"
    meta = read_meta(str(at_notice))
    assert meta["images_seen"] == 5 * 32 and meta["epoch"] == 1, meta
    assert (run_dir / ".fault_injected_step_5").is_file()  # the noticed worker ended after it
    # counted as a preemption, not a failure, and resumed from that checkpoint
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "restarting from the newest" in m], messages
    restarts = [m for m in messages if "restarting from the checkpoint written for it" in m]
    assert len(restarts) == 1 and "preemption 1 of unlimited" in restarts[0], messages
    assert f"resuming from {at_notice}" in "".join(capfd.readouterr())
    assert result.metrics["step"] == 6 and result.metrics["images_seen"] == 2 * 96
    assert result.metrics["world_size"] == 1

    # epoch 1 across the resize: 64 images on 2 workers, the rest on 1, each image once
    at_notice_ids = torch.load(at_notice / "state.pt", weights_only=True)["trained_images"]
    assert len(at_notice_ids[1]) == 64 == len(set(at_notice_ids[1].tolist()))
    final = torch.load(Path(result.checkpoint_path) / "state.pt", weights_only=True)
    epoch1 = final["trained_images"][1].tolist()
    assert len(epoch1) == 96 == len(set(epoch1)), "an image trained twice or one lost"
    assert set(at_notice_ids[1].tolist()) <= set(epoch1)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    notices = client.get_metric_history(result.mlflow_run_id, "preemption_notices")
    assert [(m.value, m.step) for m in notices] == [(1.0, 5)]
    restarts = client.get_metric_history(result.mlflow_run_id, "preemptions")
    assert [m.value for m in restarts] == [1.0]
    assert not client.get_metric_history(result.mlflow_run_id, "restarts")
