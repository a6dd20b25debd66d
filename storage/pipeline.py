"""Read-ahead: run a producing iterator in its own thread so its work overlaps the consumer's.

Encryption, hashing (both release the GIL), S3 transfers and gRPC sends then proceed in
parallel instead of in series. The queue is bounded, so memory stays at ``depth`` items.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar, cast

T = TypeVar("T")
_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def read_ahead(source: Iterable[T], depth: int) -> Iterator[T]:
    """Yield ``source``'s items, produced up to ``depth`` items ahead in another thread.

    The producer's exception is re-raised unchanged (the same object) in the consumer.
    When the consumer stops early, the producer stops at its next item and the source
    is closed, so an abandoned stream releases its connections.
    """
    items: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        iterator = iter(source)
        try:
            for item in iterator:
                if not _offer(items, item, stop):
                    return
            _offer(items, _END, stop)
        except BaseException as e:  # noqa: BLE001  (handed to the consumer)
            _offer(items, _Failure(e), stop)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    # In the consumer's context: the producer's S3, SQL and token calls work for the same
    # call, under its deadline (storage.deadlines).
    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(produce,), name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield cast(T, item)
    finally:
        stop.set()


def _offer(items: queue.Queue[object], item: object, stop: threading.Event) -> bool:
    """Put ``item`` unless the consumer has gone; False when it has."""
    while not stop.is_set():
        try:
            items.put(item, timeout=0.5)
        except queue.Full:
            continue
        return True
    return False
