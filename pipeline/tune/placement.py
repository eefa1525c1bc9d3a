"""Release the placement group of a trial's Train workers once the trial has ended.

When ASHA stops a trial, Tune ends the trial's process and with it the Ray Train controller, so
the controller never removes its workers' placement group. Ray Train's own ``PlacementGroupCleaner``
does it only through the State API (the dashboard); where that is unavailable the group stayed,
and every later trial waited for the CPUs it held: a 12-trial sweep lost its last 8 trials to it.
This Tune callback is the safety net: when a trial ends and no other trial runs, it removes the
placement groups created since that trial started (Tune's own 0.1-CPU trial groups excepted).
"""

from __future__ import annotations

import logging

import ray
from ray import tune
from ray.util.placement_group import PlacementGroup, remove_placement_group

log = logging.getLogger("dino_ray.tune")


def _created_groups(skip: dict[str, float]) -> set[str]:
    """Ids of the placement groups alive now, except those whose every bundle is ``skip``."""
    table = ray.util.placement_group_table()
    return {
        pid
        for pid, info in table.items()
        if info["state"] == "CREATED" and not all(dict(b) == skip for b in info["bundles"].values())
    }


class ReleaseTrialPlacementGroups(tune.Callback):
    def __init__(self, trial_bundle: dict[str, float]) -> None:
        self.trial_bundle = dict(trial_bundle)
        self.before: dict[str, set[str]] = {}  # trial id -> groups alive when it started

    # iteration, trials and info: Tune's Callback signature (the hooks are called by keyword)
    def on_trial_start(self, iteration, trials, trial, **info) -> None:  # noqa: ARG002
        self.before[trial.trial_id] = _created_groups(self.trial_bundle)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:  # noqa: ARG002
        self._release(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:  # noqa: ARG002
        self._release(trial)

    def _release(self, trial) -> None:
        before = self.before.pop(trial.trial_id, None)
        if before is None or self.before:  # another trial runs: its groups cannot be told apart
            return
        for pid in _created_groups(self.trial_bundle) - before:
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pid)))
                log.info("released placement group %s left by trial %s", pid, trial.trial_id)
            # best effort: Ray may have removed it. A bad id or a group Ray no longer knows
            # raises ValueError, the core worker's RPC a RayError (RaySystemError, RpcError,
            # GetTimeoutError), its IO an OSError
            except (ray.exceptions.RayError, ValueError, OSError) as exc:
                log.debug("placement group %s: %s", pid, exc)
