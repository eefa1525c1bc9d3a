"""Which training failures are worth a retry: a dead worker or node, a transient storage error.

Ray Train V2 retries every worker-group error up to ``FailureConfig.max_failures``, so a NaN loss
or a config error replayed itself ``max_failures`` times (forever with -1). The driver therefore
runs the ``TorchTrainer`` with no retries of its own and decides here: a deterministic error
(bad config, unknown arch, NaN, corpus problems, a resume mismatch) fails the run at once; a
death (actor/node died, a peer's collective broken by that death) or a transient storage error
reruns the trainer with the same name and storage path, which resumes from the last checkpoint.
A run that fails for good raises ``TrainingError`` to the caller.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import ray.exceptions as rex
import torch.distributed as dist

from dino_model.step import NonFiniteLossError
from pipeline.checkpoints import storage_error_for_good
from pipeline.config import ConfigError
from pipeline.data.quality import DataQualityError
from pipeline.data.sources import CorpusError
from pipeline.train.errors import ResumeMismatchError, TrainingError

__all__ = [
    "ResumeMismatchError",
    "TrainingError",
    "causes",
    "classify",
    "root_cause",
    "root_message",
]

# what a surviving rank raises when a peer's process or node is gone: gloo raises a plain
# RuntimeError ("Connection closed by peer ... typically caused by a remote worker crashing",
# torch 2.x), NCCL and the rendezvous store raise torch.distributed's DistError subclasses
_PEER_LOST = re.compile(
    r"Connection (closed|reset) by peer|remote worker crash|Broken pipe|"
    r"remote process exited|ncclRemoteError",
    re.IGNORECASE,
)


_DETERMINISTIC = (
    NonFiniteLossError,
    ConfigError,
    DataQualityError,
    CorpusError,
    ResumeMismatchError,
)


_DEATH_NAMES = (
    "ActorDiedError",
    "RayActorError",
    "NodeDiedError",
    "WorkerCrashedError",
    "OwnerDiedError",
    "ObjectLostError",
    "ActorUnavailableError",
    "ObjectFetchTimedOutError",
    "LocalRayletDiedError",
    "ActorUnschedulableError",
)
_DEATHS = tuple(getattr(rex, n) for n in _DEATH_NAMES if hasattr(rex, n))


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, every worker failure Ray Train wrapped in it, and their causes (depth first)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(failures.values())
        # Ray Train V2 wraps a worker's own exception in UserExceptionWithTraceback (``_base_exc``)
        # and a dead worker in WorkerHealthCheckFailedError (``health_check_failure``)
        for attr in ("cause", "controller_failure", "health_check_failure", "_base_exc"):
            inner = getattr(e, attr, None)
            if isinstance(inner, BaseException):
                stack.append(inner)
        if e.__cause__ is not None:
            stack.append(e.__cause__)


def classify(exc: BaseException) -> str:
    """``"deterministic"`` or ``"retryable"``. A known deterministic error anywhere in the chain
    wins (the other ranks' errors are collateral); else any death or storage I/O error retries;
    anything else (a bug) is deterministic."""
    chain = list(causes(exc))
    if any(isinstance(e, _DETERMINISTIC) for e in chain):
        return "deterministic"
    if any(isinstance(e, _DEATHS) for e in chain):
        return "retryable"
    if any(
        type(e).__name__
        in (
            "WorkerGroupStartupTimeoutError",
            "WorkerGroupStartupFailedError",
            "PreemptionError",
            "WorkerHealthCheckFailedError",
            "WorkerHealthCheckTimeoutError",
        )
        for e in chain
    ):
        return "retryable"
    if any(storage_error_for_good(e) for e in chain):
        return "deterministic"
    if any(isinstance(e, (OSError, ConnectionError, TimeoutError)) for e in chain):
        return "retryable"
    # a peer lost before Ray has noticed the death (a node's loss takes the health checks
    # seconds to tens of seconds; its peers' collectives fail at once): retried when every
    # failed rank failed so, as a bug on one rank also breaks its peers' collectives
    failed = _worker_failures(chain) or [exc]
    if all(any(_peer_lost(e) for e in causes(f)) for f in failed):
        return "retryable"
    return "deterministic"


def _worker_failures(chain: list[BaseException]) -> list[BaseException]:
    """Each failed rank's error, from every ``WorkerGroupError`` in ``chain``."""
    return [
        f
        for e in chain
        if isinstance(getattr(e, "worker_failures", None), dict)
        for f in e.worker_failures.values()
    ]


def _peer_lost(exc: BaseException) -> bool:
    """A collective or rendezvous broken because another rank went away."""
    if isinstance(exc, (dist.DistNetworkError, dist.DistBackendError, dist.DistStoreError)):
        return True
    return isinstance(exc, RuntimeError) and bool(_PEER_LOST.search(str(exc)))


def root_cause(exc: BaseException) -> BaseException:
    """The error to show: a deterministic one if any rank raised one, else a death, else the
    innermost error."""
    chain = list(causes(exc))
    for types in (_DETERMINISTIC, _DEATHS):
        found = [e for e in chain if isinstance(e, types)]
        if found:
            return found[0]
    return chain[-1]


def root_message(exc: BaseException) -> str:
    """One line for the error that matters (Ray wraps worker errors in several layers)."""
    root = root_cause(exc)
    text = str(root).strip().splitlines()
    return f"{type(root).__name__}: {text[-1] if text else ''}"
