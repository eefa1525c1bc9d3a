"""Where a training attempt resumes: the newest checkpoint of its run, read before the worker
builds anything."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipeline.checkpoints import as_local_dir, checkpoint_uri, load_state, newest_checkpoint
from pipeline.train.failures import ResumeMismatchError

log = logging.getLogger("dino_ray.train")


@dataclass
class ResumePoint:
    """The checkpoint an attempt resumes from, read but not yet loaded into the networks."""

    saved: dict[str, Any]  # ``state.pt``: networks, centre, optimizer, scaler, counters
    source: str  # where it was read from (a path or URI)

    @property
    def global_step(self) -> int:
        return int(self.saved["global_step"])


def resume_point(ckpt, storage: str | None, name: str, num_images: int) -> ResumePoint | None:
    """The newest checkpoint of the run (``resume_state``), or None for a new run;
    ``ResumeMismatchError`` when its epochs hold more images than the corpus has now. The world
    size may differ: the run's epochs and schedules are counted in images
    (``pipeline.train.elastic``)."""
    saved, source = resume_state(ckpt, storage, name)
    if saved is None:
        return None
    if int(saved.get("epoch_images", 0)) > num_images:
        raise ResumeMismatchError(
            f"checkpoint has epochs of {saved['epoch_images']} images, the corpus now "
            f"{num_images}: resume with the same data"
        )
    return ResumePoint(saved, source)


def resume_state(ckpt, storage: str | None, name: str) -> tuple[dict | None, str | None]:
    """The state to resume from: the newest of Ray Train's checkpoint and the newest complete one
    in the run directory. Ray Train registers a reported checkpoint asynchronously, so a worker
    that dies right after ``report`` leaves a persisted checkpoint the controller never heard of;
    without this scan the restart would repeat that epoch (or start over)."""
    best: tuple[int, dict, str] | None = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_state(d)
        best = (int(state["global_step"]), state, checkpoint_uri(ckpt))
    found = newest_checkpoint(storage, name) if storage else None
    if found and (best is None or found[0] > best[0]):
        newest = found[1]
        try:
            with as_local_dir(newest) as d:
                state = load_state(d)
            best = (int(state["global_step"]), state, newest)
        except Exception as exc:  # noqa: BLE001 - an incomplete copy: keep Ray's checkpoint
            log.warning("ignoring unreadable checkpoint %s: %s", newest, exc)
    return (best[1], best[2]) if best else (None, None)
