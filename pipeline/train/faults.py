"""Fault injection for the tests of failure handling: a worker that dies, a loss that turns NaN.

This exists for tests, not for users. It is no field of ``DinoConfig``, so no YAML file, CLI
override or job can reach it: only a caller of ``pipeline.training_run.run_training(faults=...)``
(the tests) can. The driver passes it to every worker in ``train_loop_config["faults"]``; the
training loop calls ``maybe_die`` before each step and ``poison`` on each step's crops.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from pipeline.checkpoints import read_run_file, write_run_file

log = logging.getLogger("dino_ray.train")


@dataclass(frozen=True)
class Faults:
    """Which faults to inject, by global step (None: that fault never happens).

    ``fail_at_step``: one rank (rank 1, or rank 0 alone) exits at that step, once per run
    directory, so the restarted worker group gets past it. ``nan_at_step``: that step's crops
    become NaN, so the loss is non-finite on every rank.
    """

    fail_at_step: int | None = None
    nan_at_step: int | None = None

    def maybe_die(
        self, *, rank: int, world: int, global_step: int, run_directory: str | None
    ) -> None:
        """Exit the process (``os._exit(1)``, as a killed worker would) when this rank is the one
        chosen to die at ``global_step`` and it has not died there before; a marker file
        ``.fault_injected_step_<n>`` in ``run_directory`` records the death."""
        if self.fail_at_step is None or global_step != self.fail_at_step:
            return
        if rank != (1 if world > 1 else 0) or run_directory is None:
            return
        marker = f".fault_injected_step_{global_step}"
        if read_run_file(run_directory, marker) is not None:
            return
        write_run_file(run_directory, marker, f"rank {rank} died at step {global_step}\n")
        log.warning("fault injection: rank %d exits at global step %d", rank, global_step)
        os._exit(1)

    def poison(self, crops: list[torch.Tensor], global_step: int) -> list[torch.Tensor]:
        """``crops`` unchanged, or all NaN at ``nan_at_step`` (the loss becomes non-finite)."""
        if self.nan_at_step is None or global_step != self.nan_at_step:
            return crops
        return [c * float("nan") for c in crops]
