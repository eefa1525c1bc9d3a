"""The share of unreadable images a run tolerates, and the error that names them.

A run whose images cannot be read where the crop actors run (a corpus on the head's disk, a bad
credential, a corrupt export) used to train zero steps and exit 0. Now the skip counters the
crop actors keep (``pipeline.data.state``) are checked after every epoch: more than
``data.max_skip_fraction`` of the images read skipped (default 10%), or nothing decoded at all,
is a ``DataQualityError`` with the counts by reason and three example paths. It is deterministic:
the training driver never retries it.
"""

from __future__ import annotations


class DataQualityError(ValueError):
    """Too many images could not be read or decoded; the message gives counts and examples."""


def skip_share(stats: dict) -> tuple[int, int, float]:
    """``(skipped, read, skipped / read)`` from ``DataHandle.stats()``."""
    skipped = int(sum(stats.get("skipped", {}).values()))
    read = skipped + int(stats.get("decoded", 0))
    return skipped, read, (skipped / read if read else 0.0)


def check_skip_share(stats: dict, max_fraction: float, *, steps: int | None = None) -> None:
    """Raise when more than ``max_fraction`` of the images read were skipped, or when ``steps``
    is 0 (a run that trains nothing is a failure whatever the share)."""
    skipped, read, share = skip_share(stats)
    if steps == 0:
        head = "trained 0 steps"
    elif read and share > max_fraction:
        head = (
            f"{share:.0%} of the images read could not be used (data.max_skip_fraction="
            f"{max_fraction:g})"
        )
    else:
        return
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(stats.get("skipped", {}).items())) or "none"
    examples = "; ".join(stats.get("examples", [])[:3]) or "none recorded"
    raise DataQualityError(
        f"{head}: {skipped} of {read} images skipped ({reasons}); e.g. {examples}. Check that "
        "data.path is readable from the data nodes (object storage on a cluster) and the files "
        "are images"
    )
