"""Fault injection for the tests of failure handling: a worker that dies, a loss that turns NaN.

Production code carries no hook for it. ``inject_faults(monkeypatch, ...)`` replaces the driver's
``train_loop_per_worker`` (``pipeline.train.attempts``) by a wrapper that, inside each Train
worker, wraps the loop's ``train_step`` and then runs the real loop: at ``fail_at_step`` one rank
(rank 1, or rank 0 alone) exits once per run directory, as a killed worker would; at
``nan_at_step`` that step's crops become NaN on every rank. This module is pickled by value
(``ray.cloudpickle.register_pickle_by_value``): the workers need not import ``tests/``.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import ray.cloudpickle

import pipeline.train.attempts
import pipeline.train.loop
from pipeline.checkpoints import read_run_file, write_run_file

log = logging.getLogger("dino_ray.train")

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def inject_faults(monkeypatch, *, fail_at_step: int | None = None, nan_at_step: int | None = None):
    """Every Train worker started by this test's runs injects these faults (by global step)."""
    real_loop = pipeline.train.loop.train_loop_per_worker
    monkeypatch.setattr(
        pipeline.train.attempts,
        "train_loop_per_worker",
        functools.partial(_loop_with_faults, real_loop, fail_at_step, nan_at_step),
    )


def _loop_with_faults(real_loop, fail_at_step, nan_at_step, config: dict) -> None:
    real_step = pipeline.train.loop.train_step
    run_dir = config.get("run_dir")

    def train_step(state, crops, *rest):  # rest: the iBOT masks, where the run has them
        if state.global_step == fail_at_step:
            _maybe_die(state.rank, state.world, state.global_step, run_dir)
        if state.global_step == nan_at_step:
            crops = [c * float("nan") for c in crops]
        return real_step(state, crops, *rest)

    pipeline.train.loop.train_step = train_step
    try:
        real_loop(config)
    finally:
        pipeline.train.loop.train_step = real_step


def _maybe_die(rank: int, world: int, global_step: int, run_dir: str | None) -> None:
    """``os._exit(1)`` on the chosen rank, once: a marker ``.fault_injected_step_<n>`` in the run
    directory records the death, so the restarted group gets past it."""
    if rank != (1 if world > 1 else 0) or run_dir is None:
        return
    marker = f".fault_injected_step_{global_step}"
    if read_run_file(run_dir, marker) is not None:
        return
    write_run_file(run_dir, marker, f"rank {rank} died at step {global_step}\n")
    log.warning("fault injection: rank %d exits at global step %d", rank, global_step)
    os._exit(1)
