"""An ordered thread-pool map that pulls its input lazily.

``ThreadPoolExecutor.map`` submits every item before yielding the first result, so a generator
of image bytes is read whole into RAM first (``dino-ray data inspect`` on a corpus larger than
memory). ``bounded_map`` keeps at most ``window`` items in flight.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(
    fn: Callable[[T], R], items: Iterable[T], threads: int = 4, window: int | None = None
) -> Iterator[R]:
    """``fn(item)`` for every item, in input order, on ``threads`` threads, with at most
    ``window`` (default ``4 * threads``) items submitted and not yet yielded."""
    threads = max(1, int(threads))
    window = max(1, int(window or 4 * threads))
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(threads) as pool:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
