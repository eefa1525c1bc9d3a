"""Storage errors: which ones a retry can fix, and a bounded retry for those.

One classification for every reader and writer: the crop stage and the evaluation reading images,
the Parquet reader, the checkpoint listing and the storage probe. A transient error (an S3 503 or
SlowDown, a dropped connection, a timeout) is tried again with a growing pause; one no retry can
fix (permission, a missing path or bucket, a full disk or quota, a read-only file system, bad
credentials) is raised at once. An image read that keeps failing transiently raises
``TransientReadError``: it fails the task (Ray Data's, and so the training attempt, which Ray
Train retries from its checkpoint), and is never counted as a bad image.
"""

from __future__ import annotations

import errno
import re
import time
from collections.abc import Callable
from typing import TypeVar

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
_FOR_GOOD_TYPES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_FOR_GOOD_TEXT = re.compile(
    r"ACCESS_DENIED|AccessDenied|Access Denied|Forbidden|NoSuchBucket|NO_SUCH_BUCKET|"
    r"NoSuchKey|NO_SUCH_KEY|Path does not exist|"
    r"InvalidAccessKeyId|SignatureDoesNotMatch|No space left|Disk quota|Read-only file system|"
    r"Permission denied|Not a directory",
    re.IGNORECASE,
)
READ_TRIES = 4  # an image read: 3 pauses of 0.5, 1 and 1.5 s (3 s) before the task fails
READ_BACKOFF_S = 0.5

T = TypeVar("T")


class TransientReadError(OSError):
    """A read that failed transiently ``READ_TRIES`` times: the task fails (and is retried by
    Ray); the image is not counted as bad."""


def storage_error_for_good(exc: BaseException) -> bool:
    """An I/O error that a retry cannot fix: permission, a missing path or bucket, a full disk or
    quota, a read-only file system, bad credentials."""
    if not isinstance(exc, OSError) or isinstance(
        exc, (ConnectionError, TimeoutError, TransientReadError)
    ):
        return False
    if isinstance(exc, _FOR_GOOD_TYPES):
        return True
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


def read_retrying(
    call: Callable[[], T], what: str, *, tries: int | None = None, backoff_s: float | None = None
) -> T:
    """``retry_transient(call)`` for a read of ``what`` (``READ_TRIES``, ``READ_BACKOFF_S`` by
    default); a transient error still there after ``tries`` becomes ``TransientReadError``
    naming ``what``. Errors no retry can fix are raised as they are."""
    tries = READ_TRIES if tries is None else tries
    backoff_s = READ_BACKOFF_S if backoff_s is None else backoff_s
    try:
        return retry_transient(call, tries=tries, backoff_s=backoff_s)
    except OSError as exc:
        if storage_error_for_good(exc):
            raise
        raise TransientReadError(
            f"reading {what} failed {tries} times with a transient storage error "
            f"({first_line(exc)}); the task fails so that Ray retries it"
        ) from exc
