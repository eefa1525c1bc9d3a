"""Fault injection for the tests of failure handling: a worker that dies, a loss that turns NaN.

Production code carries no hook for it. ``inject_faults(monkeypatch, ...)`` replaces the driver's
``train_loop_per_worker`` (``pipeline.train.attempts``) by a wrapper that, inside each Train
worker, wraps the loop's ``train_step`` and then runs the real loop: at ``fail_at_step`` one rank
(rank 1, or rank 0 alone) exits once per run directory, as a killed worker would; at
``nan_at_step`` that step's crops become NaN on every rank. This module is pickled by value
(``ray.cloudpickle.register_pickle_by_value``): the workers need not import ``tests/``.
``inject_preemption`` gives a preemption notice, then ends the noticed worker, through the seam
``pipeline.train.preemption.preemption_info`` (Ray's own call everywhere else).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time

import ray.cloudpickle
from ray.train.v2.api.preemption import PreemptionInfo

import pipeline.train.attempts
import pipeline.train.loop
import pipeline.train.preemption
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


def _maybe_die(
    rank: int, world: int, global_step: int, run_dir: str | None, always: bool = False
) -> None:
    """``os._exit(1)`` on the chosen rank (``always``: this one), once: a marker
    ``.fault_injected_step_<n>`` in the run directory records the death, so the restarted group
    gets past it."""
    if (not always and rank != (1 if world > 1 else 0)) or run_dir is None:
        return
    marker = f".fault_injected_step_{global_step}"
    if read_run_file(run_dir, marker) is not None:
        return
    write_run_file(run_dir, marker, f"rank {rank} died at step {global_step}\n")
    log.warning("fault injection: rank %d exits at global step %d", rank, global_step)
    os._exit(1)


def inject_preemption(monkeypatch, *, notice_at_step: int, restart_workers: int | None = None):
    """Every Train worker of this test's runs gets a preemption notice (what
    ``ray.train.get_preemption_info`` returns when Ray sees a node drained) once the run reaches
    step ``notice_at_step`` (the run's step: ``TrainState.run_step``), in the attempt that
    started before it; the noticed rank (the last one) then exits at its next step, once per run
    directory, as its node would be taken. ``restart_workers``: the attempts after the first get
    that many workers, as Ray's elastic restart does when the taken node's slot is gone (the
    shared local Ray would place the old size again)."""
    if restart_workers is not None:
        real_build = pipeline.train.attempts.build_trainer
        built = []

        def build_trainer(cfg, *args, **kwargs):
            if built:
                cfg = cfg.with_overrides({"train.num_workers": restart_workers})
            built.append(cfg)
            return real_build(cfg, *args, **kwargs)

        monkeypatch.setattr(pipeline.train.attempts, "build_trainer", build_trainer)
    real_loop = pipeline.train.loop.train_loop_per_worker
    monkeypatch.setattr(
        pipeline.train.attempts,
        "train_loop_per_worker",
        functools.partial(_loop_with_preemption, real_loop, notice_at_step),
    )


def _loop_with_preemption(real_loop, notice_at_step, config: dict) -> None:
    real_step = pipeline.train.loop.train_step
    real_info = pipeline.train.preemption.preemption_info
    real_poll = pipeline.train.preemption.POLL_STEPS
    run_dir = config.get("run_dir")
    now: dict = {}  # this worker's state and whether its notice was given

    def train_step(state, crops, *rest):
        now["state"] = state
        if now.get("noticed") and state.rank == state.world - 1:
            _maybe_die(state.rank, state.world, state.global_step, run_dir, always=True)
        return real_step(state, crops, *rest)

    def preemption_info():
        state = now["state"]
        started = state.clock.run_step(state.start_step)
        if started < notice_at_step <= state.run_step:  # every rank agrees, as Ray's broadcast
            now["noticed"] = True
            deadline_ms = int((time.time() + 60) * 1000)
            return PreemptionInfo(deadline_ms, {"the-spot-node": [state.world - 1]})
        return None

    pipeline.train.loop.train_step = train_step
    pipeline.train.preemption.preemption_info = preemption_info
    pipeline.train.preemption.POLL_STEPS = 1
    try:
        real_loop(config)
    finally:
        pipeline.train.loop.train_step = real_step
        pipeline.train.preemption.preemption_info = real_info
        pipeline.train.preemption.POLL_STEPS = real_poll
