"""The driver's progress lines: what they say, the time left, and that they reach stdout at INFO
while other loggers stay at WARNING."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

from pipeline.train.progress import Progress, duration

ROOT = Path(__file__).resolve().parents[1]


def test_lines_say_where_the_run_is_and_how_long_is_left():
    now = [100.0]
    p = Progress(epochs=3, steps_per_epoch=10, start_step=5, clock=lambda: now[0])
    now[0] += 20.0  # 10 steps (5 -> 15) in 20 s: 2 s a step, 15 steps left
    line = p.step_line(
        {"epoch": 1, "step": 15, "loss": 4.25, "images_per_s": 1234.4, "data_wait_fraction": 0.031}
    )
    assert line == "epoch 2/3  step 15/30  loss 4.250  1,234 img/s  data wait 3%  left 30s"
    assert p.epoch_line(
        {
            "epoch": 2,
            "epoch_loss": 4.0,
            "epoch_images_per_s": 900.0,
            "epoch_data_wait_fraction": 0.0,
            "subset_knn_top1": 51.234,  # the in-training figure, on a subset of the split
            "subset_knn_val_size": 1200,
        }
    ) == (
        "epoch 3/3 done  loss 4.000  900 img/s  data wait 0%  "
        "k-NN top-1 51.23 (val subset 1,200, k=20)"
    )
    assert math.isnan(Progress(1, 5, clock=lambda: 0.0).left_s(0))  # no step yet: no rate
    assert "left ?" in Progress(1, 5).step_line({"step": 0})
    assert [duration(s) for s in (42, 662, 3720)] == ["42s", "11m02s", "1h02m"]


def _python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter: its real stdout and stderr, with no pytest handlers on the
    root logger (under pytest they take every record, so nothing would reach stderr either way),
    and no MLFLOW_* settings inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=ROOT
    )


def test_progress_reaches_stdout_at_info_and_library_noise_does_not():
    out = _python(
        "import logging; from pipeline.console import setup_console; "
        "setup_console(); setup_console(); "  # idempotent: one handler
        "logging.getLogger('dino_ray.progress').info('epoch 1/1 done'); "
        "logging.getLogger('mlflow.models.signature').warning('inferred a signature'); "
        "logging.getLogger('alembic.runtime.migration').info('running upgrade'); "
        "logging.getLogger('dino_ray.train').info('not shown'); "
        "logging.getLogger('dino_ray.train').warning('a real warning')"
    )
    assert out.stdout == "epoch 1/1 done\n"  # the progress line, bare, once, on stdout only
    # warnings of our own still reach stderr, so the quiet above is not an empty stderr by chance
    assert out.stderr == "WARNING dino_ray.train: a real warning\n"


def test_mlflow_imported_after_the_console_setup_stays_quiet():
    """MLflow sets its loggers' level on first import (after ``setup_console`` when a command
    imports it lazily): the setup reaches it through MLFLOW_LOGGING_LEVEL, and artifact downloads
    draw no progress bar."""
    code = (
        "import os, logging; from pipeline.console import setup_console; setup_console(); "
        "import mlflow; from mlflow.environment_variables import "
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR as bar; "
        "print(logging.getLogger('mlflow').getEffectiveLevel(), bar.get())"
    )
    out = _python(code).stdout.split()
    assert out == [str(logging.ERROR), "False"]
