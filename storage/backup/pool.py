"""A bounded, ordered parallel map for the backup walks (restore, drill, verify).

Why not ``ThreadPoolExecutor.map``: it submits every item at once, so a walk over a
manifest of ten million objects would hold ten million futures (and a generator of
database rows would be drained into memory). Here at most ``2 x workers`` items are in
flight; results come back in input order, so reports and failures keep a stable order.
The work is I/O (S3 reads and writes) and C code that releases the GIL (SHA-256 and
AES-GCM over large buffers, PKCS#11 calls), so threads overlap well.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_WORKERS = 64


def check_workers(workers: int) -> int:
    """``workers`` if it is from 1 to ``MAX_WORKERS``; else ``ValueError`` naming the range."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be from 1 to {MAX_WORKERS}, not {workers}")
    return workers


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Generator[R, None, None]:
    """``fn`` over ``items`` on ``workers`` threads, at most ``2 x workers`` in flight.

    Results are yielded in the order of ``items``; an exception of ``fn`` is raised when
    its result is reached. Closing the generator early (callers wrap it in
    ``contextlib.closing``, so a consumer that raises, e.g. for a client that went
    away, closes it at once) cancels what has not started and waits for what has.
    """
    check_workers(workers)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="backup-walk")
    window: deque[Future[R]] = deque()
    try:
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
