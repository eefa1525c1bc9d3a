"""Is ``train.storage_path`` usable? Checked before any Ray work by writing and deleting a probe
object, so a read-only bucket, a missing one or bad credentials fail the run in its first second
instead of at the first checkpoint (where a retry would retrain the epoch, forever with
``train.max_failures=-1``). The same test tells the driver's retry logic which storage errors
no retry can fix."""

from __future__ import annotations

import uuid

from pipeline.data.retry import first_line, retry_transient, storage_error_for_good
from pipeline.data.sources import resolve_filesystem
from pipeline.preflight import PreflightError

__all__ = ["check_storage_writable", "first_line", "retry_transient", "storage_error_for_good"]

PROBE_TRIES = 3  # a transient error (an S3 503, a dropped connection) is tried again


def check_storage_writable(storage_path: str, *, backoff_s: float = 1.0) -> None:
    """Write and delete ``<storage_path>/.dino-ray-probe-<random>``; ``PreflightError`` naming
    ``train.storage_path`` when that fails for good or ``PROBE_TRIES`` times."""
    try:
        retry_transient(
            lambda: _write_and_delete_probe(storage_path), tries=PROBE_TRIES, backoff_s=backoff_s
        )
    except OSError as exc:
        raise PreflightError(
            f"train.storage_path={storage_path!r} is not writable ({first_line(exc)}); "
            "checkpoints go there: give this machine and the train nodes write access, or "
            "choose another path"
        ) from None


def _write_and_delete_probe(storage_path: str) -> None:
    fs, base = resolve_filesystem(storage_path)
    if "://" not in storage_path:
        fs.create_dir(base, recursive=True)
    probe = f"{base.rstrip('/')}/.dino-ray-probe-{uuid.uuid4().hex}"
    with fs.open_output_stream(probe) as out:
        out.write(b"dino-ray storage probe\n")
    fs.delete_file(probe)
