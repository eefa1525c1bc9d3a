"""One way for tests to wait on something that happens in another process (a job's state, a
checkpoint in the bucket, a count sent without waiting for a reply, a log line)."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(
    read: Callable[[], T],
    what: str,
    done: Callable[[T], object] = bool,
    limit_s: float = 120.0,
    poll_s: float = 0.2,
) -> T:
    """Poll ``read()`` until ``done(value)`` holds and return that value. The limit only stops a
    broken test from hanging (it asserts no speed); the failure shows the last value read."""
    deadline = time.monotonic() + limit_s
    value = read()
    while not done(value):
        assert time.monotonic() < deadline, (
            f"never happened in {limit_s:g} s: {what} (last read: {value!r:.300})"
        )
        time.sleep(poll_s)
        value = read()
    return value
