"""Bridges between the asyncio gRPC server and the blocking record store.

The store (S3, SQL and PKCS#11 clients) is synchronous; it runs in worker threads.
``SyncRequests`` lets a worker pull request messages from the event loop (and learn
that the call was cancelled), and
``prefetch`` runs a blocking iterator in a worker so that producing the next chunk
(S3 read, decryption) overlaps sending the current one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Generic, TypeVar

from service.errors import ServiceError

T = TypeVar("T")
_END = object()
# A backstop only: the edge ends a silent stream after server.idle_seconds (at most
# config.MAX_IDLE_SECONDS), which reaches the worker as that call's error well before this.
IDLE_TIMEOUT_SECONDS = 360.0


class StreamCancelledError(ServiceError):
    """The call was cancelled while its worker ran (CANCELLED): what it received must not
    be stored, since the end of its request stream may not have been the client's."""


class SyncRequests(Generic[T]):
    """A blocking iterator over an async iterator, for use from a worker thread.

    grpc ends the request stream of a cancelled call exactly as if the client had
    finished sending, and tells the handler (its task is cancelled) separately, in no
    fixed order. A worker that took such an end for the end of the content would commit
    a truncated record after its caller was told the call was cancelled, and after the
    call's slot was released. So the handler ``abandon``-s the worker when it is
    cancelled, and the worker checks (``check_live``) before it commits anything.
    """

    def __init__(
        self,
        source: AsyncIterator[T],
        loop: asyncio.AbstractEventLoop,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> None:
        self._source = source
        self._loop = loop
        self._cancelled = cancelled  # the call's own flag, read on the loop
        self._abandoned = threading.Event()

    def abandon(self) -> None:
        """The handler stopped waiting for the worker (the call was cancelled)."""
        self._abandoned.set()

    def check_live(self) -> None:
        """``StreamCancelledError`` once the call was cancelled."""
        if self._abandoned.is_set():
            raise StreamCancelledError("the call was cancelled; nothing was stored")

    def confirm_live(self) -> None:
        """``check_live`` after a hop through the event loop, for the last moment before
        a commit: the loop first runs what is pending (a cancellation delivered after the
        stream's end), and the call's own cancelled flag is read there."""

        async def cancelled() -> bool:
            await asyncio.sleep(0)
            return self._cancelled()

        future = asyncio.run_coroutine_threadsafe(cancelled(), self._loop)
        if future.result(timeout=IDLE_TIMEOUT_SECONDS):
            self._abandoned.set()
        self.check_live()

    def __iter__(self) -> Iterator[T]:
        return self

    async def _next(self) -> object:
        try:
            return await anext(self._source)
        except StopAsyncIteration:
            return _END

    def __next__(self) -> T:
        self.check_live()
        future = asyncio.run_coroutine_threadsafe(self._next(), self._loop)
        item = future.result(timeout=IDLE_TIMEOUT_SECONDS)
        if item is _END:
            raise StopIteration
        return item  # type: ignore[return-value]  # _END is the only non-T value


class _Producer(Generic[T]):
    """Runs ``make()`` in a worker thread, handing items to the loop ``depth`` ahead."""

    def __init__(self, make: Callable[[], Iterator[T]], depth: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.items: asyncio.Queue[tuple[object, BaseException | None]] = asyncio.Queue()
        self.slots = threading.Semaphore(depth)
        self.stop = threading.Event()
        self._make = make

    def _hand_over(self, item: object, error: BaseException | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, (item, error))
        except RuntimeError:  # the loop closed: the server is shutting down
            self.stop.set()

    def run(self) -> None:
        iterator = self._make()
        try:
            for item in iterator:
                self.slots.acquire()
                if self.stop.is_set():
                    return
                self._hand_over(item, None)
            self._hand_over(_END, None)
        except BaseException as e:  # noqa: BLE001  (handed to the consumer)
            self._hand_over(_END, e)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()


async def prefetch(make: Callable[[], Iterator[T]], depth: int = 2) -> AsyncIterator[T]:
    """Yield the items of ``make()``, produced in a worker thread up to ``depth`` ahead.

    Errors of the producer are re-raised here. If the consumer stops early (the client
    went away), the producer stops at its next item and closes its iterator.
    """
    producer = _Producer(make, depth)
    # A thread of its own, not the shared pool: a client that stops reading holds only
    # its own producer, never a worker the guard and the audit trail need.
    threading.Thread(target=producer.run, name="prefetch", daemon=True).start()
    try:
        while True:
            item, error = await producer.items.get()
            if error is not None:
                raise error
            if item is _END:
                return
            producer.slots.release()
            yield item  # type: ignore[misc]  # only _END is not a T
    finally:
        producer.stop.set()
        producer.slots.release()
