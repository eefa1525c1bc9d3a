"""Ray Train DINO loop on the shared local Ray: 2 workers with a worker death + MLflow, a NaN stop
and resume equivalence of the DINOv2 recipe on 2 workers (a worker death in the resumed run, an
unreachable tracking server), Ctrl-C, skipped images. Tiny ViT (patch 4, 32/16 px), K=256."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest
import torch
from fault_injection import inject_faults
from presets import tiny_config
from safetensors.torch import save_file

from dino_model.backbone import build_backbone
from pipeline.checkpoints import (
    load_state,
    load_teacher_backbone,
    newest_checkpoint_path,
    read_meta,
)
from pipeline.preflight import PreflightError
from pipeline.train.failures import TrainingError
from pipeline.training_run import run_training

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,  # fault-tolerance runs: `make test-all`, CI
    pytest.mark.timeout(1800),
]  # up to three runs a test: 110 s idle, far more loaded


def test_two_workers_survive_a_worker_death_and_log_to_mlflow(
    ray_session, digits_dir, tmp_path, mlflow_sqlite, monkeypatch, caplog, capfd
):
    uri = mlflow_sqlite(tmp_path / "mlflow.db")
    # released weights (issue 21): a tiny ViT of another seed, saved as safetensors; the run
    # starts both backbones from them and trains the head alone in its first epoch
    torch.manual_seed(123)
    released = build_backbone("test_vit", img_size=32, patch_size=4).state_dict()
    save_file(released, tmp_path / "released.safetensors")
    cfg = tiny_config(
        digits_dir,
        tmp_path / "runs",
        "ft",
        train__num_workers=2,
        train__max_failures=1,
        model__head_use_bn=True,
        model__init_from=str(tmp_path / "released.safetensors"),
        optim__freeze_backbone_epochs=1,
        tracking__enabled=True,
        tracking__tracking_uri=uri,
    )
    steps: list[dict] = []
    epochs: list[dict] = []
    caplog.set_level(logging.WARNING, logger="dino_ray.train")
    inject_faults(monkeypatch, fail_at_step=4)
    result = run_training(cfg, on_step_metrics=steps.append, on_epoch_metrics=epochs.append)

    # rank 1 died once at step 4 (marker) ...
    assert (Path(result.run_dir) / ".fault_injected_step_4").is_file()
    # ... the driver saw the attempt fail and restarted it once, from the step-3 checkpoint
    restarts = [
        r.getMessage() for r in caplog.records if "restarting from the newest" in r.getMessage()
    ]
    assert len(restarts) == 1, restarts
    assert restarts[0].startswith("training attempt 1 failed")
    restart_ckpt = re.search(r"newest checkpoint \((\S+); 1 of 1 retries\)", restarts[0])
    assert restart_ckpt, restarts[0]
    # ... and rank 0 of the new group loaded it: the resume line (a worker's, on the driver's
    # stderr through Ray's log forwarding) names that checkpoint and step 3 = epoch 1's start
    worker_lines = "".join(capfd.readouterr())
    assert f"resuming from {restart_ckpt.group(1)} at global step 3 (epoch 1)" in worker_lines
    assert load_state(restart_ckpt.group(1))["global_step"] == 3
    # the step reports: one drop (the restart), after which training goes on from the step-3
    # checkpoint (its first report is past step 3), not from step 0, and reaches the last step
    seq = [int(s["step"]) for s in steps]
    drops = [i for i in range(1, len(seq)) if seq[i] <= seq[i - 1]]
    assert len(drops) == 1, seq
    assert seq[drops[0]] > 3 and seq[-1] == 6, seq
    assert result.metrics["step"] == 6 and result.metrics["epoch"] == 1
    assert result.metrics["backend"] == "gloo" and result.metrics["world_size"] == 2
    assert result.metrics["global_batch"] == 32
    assert [e["epoch"] for e in epochs][-2:] == [0, 1]
    assert all(math.isfinite(s["loss"]) for s in steps)
    for key in (
        "lr",
        "weight_decay",
        "momentum_teacher",
        "teacher_temp",
        "teacher_entropy",
        "kl",
        "images_per_s",
        "data_wait_fraction",
    ):
        assert key in steps[-1], key
    assert "epoch_images_per_s" in epochs[-1]
    ckpt = result.checkpoint_path
    assert ckpt and Path(ckpt, "state.pt").is_file()
    assert newest_checkpoint_path(cfg.train.storage_path, "ft") == ckpt
    state = load_state(ckpt)
    assert state["global_step"] == 6 and state["epoch"] == 2 and state["iters_per_epoch"] == 3
    assert set(state) >= {"student", "teacher", "center", "optimizer", "epoch", "global_step"}
    assert read_meta(ckpt)["global_step"] == 6
    # the first epoch (steps 1-3) trained the head alone: both backbones are the released weights
    # at the step-3 checkpoint, and the student's backbone moved in the second epoch
    warm = load_state(Path(ckpt).parent / "checkpoint_step_00000003")
    for key, value in released.items():
        assert torch.equal(warm["student"][f"backbone.{key}"], value), key
        # the EMA of equal weights, m x + (1 - m) x, moves them by rounding only
        torch.testing.assert_close(warm["teacher"][f"backbone.{key}"], value, rtol=1e-5, atol=1e-6)
    assert not torch.equal(
        warm["student"]["head.mlp.0.weight"], state["student"]["head.mlp.0.weight"]
    )
    assert any(not torch.equal(state["student"][f"backbone.{k}"], v) for k, v in released.items())
    backbone, ckpt_cfg = load_teacher_backbone(ckpt)
    assert not backbone.training and ckpt_cfg.model.out_dim == 256
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 64)

    # MLflow: params, metrics, artifacts in the run whose id came back
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result.mlflow_run_id)
    # one restart, recorded at the step of the last finished epoch before the death
    history = client.get_metric_history(result.mlflow_run_id, "restarts")
    assert [(m.value, m.step) for m in history] == [(1.0, 3)]
    assert run.data.params["train.num_workers"] == "2"
    assert run.data.params["model.out_dim"] == "256"
    assert {"loss", "epoch_loss", "lr", "teacher_entropy"} <= set(run.data.metrics)
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"resolved_config.yaml", "training.png"} <= artifacts


def test_nan_stop_and_a_worker_death_resume_to_the_uninterrupted_run_parameter_for_parameter(
    ray_session, digits_dir, tmp_path, monkeypatch, caplog
):
    # the DINOv2 recipe on 2 workers: registers, iBOT on masks from the crop actors (a separate
    # head), Sinkhorn-Knopp centring (all-reduced over the workers), KoLeo, layer-wise lr decay
    common = dict(
        train__num_workers=2,
        train__epochs=2,
        train__max_steps_per_epoch=2,
        train__deterministic_data=True,
        model__drop_path_rate=0.1,
        data__limit=64,
        model__num_registers=2,
        ibot__enabled=True,
        ibot__separate_head=True,
        ibot__head_n_prototypes=128,
        loss__centering="sinkhorn_knopp",
        loss__koleo_weight=0.1,
        optim__layer_decay=0.9,
    )
    # the uninterrupted run also logs to an MLflow server that is down: a warning, no failure;
    # and it streams one epoch per execution (data.stream_rows below one epoch's rows), so the
    # loop opens a second window at epoch 1 and must match the resumed run's crops
    full = run_training(
        tiny_config(
            digits_dir,
            tmp_path / "runs",
            "full",
            tracking__enabled=True,
            data__stream_rows=1,
            tracking__tracking_uri="http://127.0.0.1:9",
            tracking__http_timeout_s=2,
            **common,
        )
    )
    assert full.mlflow_run_id is None
    assert full.metrics["step"] == 4 and Path(full.checkpoint_path, "state.pt").is_file()

    # interrupted by a NaN loss at step 3: a deterministic error, so not retried whatever
    # max_failures says; the step-2 checkpoint it leaves is finite and the resume point
    interrupted = tiny_config(digits_dir, tmp_path / "runs", "cut", train__max_failures=2, **common)
    with pytest.raises(TrainingError) as info:
        with monkeypatch.context() as patched:
            inject_faults(patched, nan_at_step=3)
            run_training(interrupted)
    msg = str(info.value)
    assert "NonFiniteLossError" in msg and "nan" in msg.lower()
    assert "restart" not in msg
    good = info.value.last_checkpoint
    assert good is not None and good == newest_checkpoint_path(
        interrupted.train.storage_path, "cut"
    )
    state = load_state(good)
    assert state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["teacher"].values())

    changed = interrupted.with_overrides({"optim.lr": 0.01})
    with pytest.raises(PreflightError, match=r"optim\.lr 0\.001 -> 0\.01"):
        run_training(changed)  # refused before any worker starts: the checkpoint is untouched
    # resumed (same name + storage: Ray Train hands back the checkpoint), and rank 1 dies at
    # step 3: the driver restarts the group from the step-2 checkpoint, which must not show
    caplog.set_level(logging.WARNING, logger="dino_ray.train")
    with monkeypatch.context() as patched:
        inject_faults(patched, fail_at_step=3)
        resumed = run_training(interrupted)
    assert (Path(resumed.run_dir) / ".fault_injected_step_3").is_file()
    restarts = [r.getMessage() for r in caplog.records if "restarting from" in r.getMessage()]
    assert len(restarts) == 1 and "checkpoint_step_00000002" in restarts[0], restarts
    assert resumed.metrics["step"] == 4 and resumed.metrics["world_size"] == 2
    assert [h["epoch"] for h in resumed.history] == [1]  # it did not start over
    with pytest.raises(PreflightError, match=r"already finished 2 epochs"):
        run_training(interrupted)  # a finished run trains nothing: refused, not a silent no-op
    sa, sb = load_state(full.checkpoint_path), load_state(resumed.checkpoint_path)
    for net in ("teacher", "student"):
        a, b = sa[net], sb[net]
        assert a.keys() == b.keys()
        assert {"backbone.reg_token", "mask_token", "ibot_head.mlp.0.weight"} <= a.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{net}.{k}")
    for centre in ("center", "ibot_center"):
        torch.testing.assert_close(sa[centre], sb[centre], rtol=1e-5, atol=1e-6)
    assert sa["ibot_center"].shape == (1, 128)
    for epoch in full.history + resumed.history:  # the DINOv2 losses reach the reports
        assert math.isfinite(epoch["epoch_ibot_loss"]) and epoch["epoch_ibot_loss"] > 0
        assert 0 < epoch["epoch_ibot_teacher_entropy"] <= math.log(128) + 1e-4
        assert epoch["epoch_koleo"] != 0


def test_ctrl_c_stops_with_a_checkpoint_and_a_killed_mlflow_run(
    ray_session, digits_dir, tmp_path, mlflow_sqlite
):
    import os
    import signal
    import threading
    import time

    from mlflow.tracking import MlflowClient

    from pipeline.train.control import TrainingInterrupted

    uri = mlflow_sqlite(tmp_path / "mlflow.db")
    cfg = tiny_config(
        digits_dir,
        tmp_path / "runs",
        "sigint",
        train__epochs=50,
        train__max_steps_per_epoch=2,
        data__limit=64,
        tracking__enabled=True,
        tracking__tracking_uri=uri,
    )
    sent: list[int] = []
    errors: list[str] = []
    done = threading.Event()

    def _interrupt_after_first_checkpoint() -> None:
        # until the run ends, however long its start takes on a loaded machine (a fixed 300 s
        # deadline ran out before the first checkpoint there, and the run trained all 50 epochs)
        while not done.is_set() and not sent:
            try:
                found = newest_checkpoint_path(cfg.train.storage_path, "sigint")
                if found:
                    sent.append(load_state(found)["global_step"])
                    os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C in a terminal sends
            except FileNotFoundError:
                pass  # deleted by train.keep_checkpoints between listing and reading: poll again
            except Exception as exc:  # noqa: BLE001 - reported below; a dead thread never sends
                errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.2)

    threading.Thread(target=_interrupt_after_first_checkpoint, daemon=True).start()
    try:
        with pytest.raises(TrainingInterrupted) as info:
            run_training(cfg)
    finally:
        done.set()
        assert not errors, errors  # newest_checkpoint_path named a checkpoint it could not load
    assert sent and "stopped by SIGINT" in str(info.value)
    good = info.value.last_checkpoint
    assert good and load_state(good)["global_step"] >= sent[0]  # it checkpointed on the way out
    assert load_state(good)["global_step"] < 100  # and stopped long before the 50 epochs
    run = MlflowClient(tracking_uri=uri).get_run(info.value.mlflow_run_id)
    assert run.info.status == "KILLED" and run.data.tags["stopped_by"] == "SIGINT"


def test_skipped_images_never_drop_the_last_steps_and_too_many_fail_once(
    ray_session, digits_dir, tmp_path
):
    import shutil

    corpus = tmp_path / "mixed"
    for cls in ("0", "1"):  # 2 classes x 30 real digits + 6 garbage files each (~17% bad)
        (corpus / cls).mkdir(parents=True)
        for png in sorted((digits_dir / cls).glob("*.png"))[:30]:
            shutil.copy(png, corpus / cls / png.name)
        for i in range(6):
            (corpus / cls / f"broken{i}.png").write_bytes(b"not a png " * 10)
    # 72 images, 16 per step: 4 steps an epoch are planned from 64 listed rows, ~53 decode
    cfg = tiny_config(
        corpus,
        tmp_path / "runs",
        "mixed",
        train__epochs=2,
        data__limit=None,
        train__max_steps_per_epoch=None,
        data__max_skip_fraction=0.5,
    )
    result = run_training(cfg)
    assert result.metrics["step"] == 2 * 4  # the stream was topped up, no step dropped
    assert sum(v for k, v in result.metrics.items() if k.startswith("skipped_")) > 0

    strict = cfg.with_overrides(
        {"train.name": "strict", "data.max_skip_fraction": 0.05, "train.max_failures": 2}
    )
    with pytest.raises(TrainingError) as info:
        run_training(strict)
    msg = str(info.value)
    assert "DataQualityError" in msg and "data.max_skip_fraction=0.05" in msg
    assert "broken" in msg and "restart" not in msg  # example paths; deterministic, not retried
