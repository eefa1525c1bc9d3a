"""Is ``train.storage_path`` usable? Checked before any Ray work by writing and deleting a probe
object, so a read-only bucket, a missing one or bad credentials fail the run in its first second
instead of at the first checkpoint (where a retry would retrain the epoch, forever with
``train.max_failures=-1``). The same test tells the driver's retry logic which storage errors
no retry can fix."""

from __future__ import annotations

import errno
import re
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from pipeline.data.sources import resolve_filesystem
from pipeline.preflight import PreflightError

# local errors a retry cannot fix, by errno; object stores' (pyarrow raises a plain OSError) by text
_FOR_GOOD_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
}
_FOR_GOOD_TEXT = re.compile(
    r"ACCESS_DENIED|AccessDenied|Access Denied|Forbidden|NoSuchBucket|NO_SUCH_BUCKET|"
    r"InvalidAccessKeyId|SignatureDoesNotMatch|No space left|Disk quota|Read-only file system|"
    r"Permission denied|Not a directory",
    re.IGNORECASE,
)
PROBE_TRIES = 3  # a transient error (an S3 503, a dropped connection) is tried again

T = TypeVar("T")


def storage_error_for_good(exc: BaseException) -> bool:
    """An I/O error that a retry cannot fix: permission, a missing path or bucket, a full disk or
    quota, a read-only file system, bad credentials."""
    if not isinstance(exc, OSError) or isinstance(exc, (ConnectionError, TimeoutError)):
        return False
    return exc.errno in _FOR_GOOD_ERRNOS or bool(_FOR_GOOD_TEXT.search(str(exc)))


def retry_transient(call: Callable[[], T], *, tries: int, backoff_s: float = 1.0) -> T:
    """``call()`` until it succeeds: a transient ``OSError`` (an S3 503, a dropped connection) is
    tried again after ``backoff_s`` x the attempt; one no retry can fix, or the last, is raised."""
    for attempt in range(1, tries + 1):
        try:
            return call()
        except OSError as exc:
            if storage_error_for_good(exc) or attempt == tries:
                raise
            time.sleep(backoff_s * attempt)
    raise ValueError(f"tries must be >= 1, got {tries}")


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``: storage errors carry whole request dumps."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


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
