"""Bridges between the asyncio gRPC server and the blocking record store.

The store (S3, SQL and PKCS#11 clients) is synchronous; it runs in worker threads.
``SyncRequests`` lets a worker pull request messages from the event loop (and learn
that the call was cancelled); the other way, ``run_in_thread`` (over ``ThreadToLoop``)
is the one bridge from a worker thread to the loop: ``prefetch`` runs a blocking
iterator on it so that producing the next chunk (S3 read, decryption) overlaps sending
the current one, and long runs report their progress through it.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from concurrent import futures
from typing import Any, Generic, TypeVar

from service.call_scope import track
from service.errors import ServiceError

T = TypeVar("T")
_END = object()
# A backstop only: the edge ends a silent stream after server.idle_seconds (at most
# config.MAX_IDLE_SECONDS), which reaches the worker as that call's error well before this.
IDLE_TIMEOUT_SECONDS = 360.0
# ``SyncRequests.prefill`` holds at most this many messages (a small record is 1 or 2).
PREFILL_MESSAGES = 4


class _Raised:
    """An error ``SyncRequests.prefill`` met, raised to the worker in its place."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Retrieve a finished task's error, so that asyncio does not log it as lost."""
    if not task.cancelled():
        task.exception()


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
        probe: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self._source = source
        self._loop = loop
        self._cancelled = cancelled  # the call's own flag, read on the loop
        # Reads the call's request stream past its end: True if it ended there
        # (``confirm_live``); None: no such barrier.
        self._probe = probe
        self._abandoned = threading.Event()
        self._gone = asyncio.Event()  # ``abandon`` on the loop, for ``confirm_live``
        # Messages read on the loop by ``prefill``, then the end or the error met there.
        self._held: collections.deque[object] = collections.deque()
        # ``start_prefill``'s task, and its end as the worker sees it.
        self._filling: asyncio.Future[None] | None = None
        self._filled = threading.Event()

    def start_prefill(self, max_bytes: int, weigh: Callable[[T], int]) -> None:
        """Run ``prefill`` on the loop beside the worker, which starts at once (it checks
        the caller's scope before it asks for content) and waits for this read-ahead only
        at its first message; ``stop_prefill`` when the call ends."""
        self._filling = asyncio.ensure_future(self.prefill(max_bytes, weigh))
        self._filling.add_done_callback(lambda _: self._filled.set())

    def stop_prefill(self) -> None:
        """Cancel a read-ahead still waiting for the client (the call has ended)."""
        if self._filling is not None:
            self._filling.cancel()

    async def prefill(
        self, max_bytes: int, weigh: Callable[[T], int], max_messages: int = PREFILL_MESSAGES
    ) -> None:
        """On the loop, read messages until they weigh ``max_bytes``, ``max_messages`` are
        held (empty ones weigh nothing) or the stream ends.

        A small stream is then whole when the worker first asks for content, and the
        worker waits on no hand-off per message (two or three thread wake-ups of a small
        put). An error met here (a refused message, an idle stream) is kept and raised to
        the worker where it would have met it, so it is handled (and audited) as before.
        """
        held = 0
        while held < max_bytes and len(self._held) < max_messages:
            try:
                item = await self._next()
            except Exception as e:  # noqa: BLE001  (raised to the worker, in order)
                self._held.append(_Raised(e))
                return
            self._held.append(item)
            if item is _END:
                return
            held += weigh(item)  # type: ignore[arg-type]  # not _END: a message

    def abandon(self) -> None:
        """On the loop: the handler stopped waiting for the worker (the call was
        cancelled)."""
        self._abandoned.set()
        self._gone.set()

    def check_live(self) -> None:
        """``StreamCancelledError`` once the call was cancelled."""
        if self._abandoned.is_set():
            raise StreamCancelledError("the call was cancelled; nothing was stored")

    def confirm_live(self) -> None:
        """``check_live`` once the call is known to be live, for the last moment before a
        commit.

        The stream's end cannot say whether the client finished or the call was
        cancelled: grpc aio ends a cancelled call's request stream like a half-close and
        reports the cancellation separately, a few milliseconds later under load (up to
        20 ms seen here). So the stream is read once more past its end (``probe``): on
        a live call grpc answers that read at once with the end again; on a cancelled
        call it does not answer it before it has cancelled the handler (none of 3,200
        cancels under load, docs/storage.md). A probe that fails, finds a message, or
        that the handler's cancellation overtakes counts as cancelled. Nothing is sent
        to the client, so a failed commit after it is still an error a client's retry
        policy retries. Without ``probe`` (unit tests), one hop through the loop.
        """

        async def live() -> bool:
            if self._probe is None:
                await asyncio.sleep(0)
                return not self._cancelled()
            ended = asyncio.ensure_future(self._probe())
            ended.add_done_callback(_retrieve)  # failed after we stopped waiting
            gone = asyncio.ensure_future(self._gone.wait())
            try:
                await asyncio.wait({ended, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if not ended.done() or ended.cancelled() or ended.exception() is not None:
                return False
            await asyncio.sleep(0)  # what the read's completion woke runs first
            return ended.result() is True and not self._cancelled()

        future = asyncio.run_coroutine_threadsafe(live(), self._loop)
        if not future.result(timeout=IDLE_TIMEOUT_SECONDS):
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
        if self._filling is not None and not self._filled.is_set():
            if not self._filled.wait(IDLE_TIMEOUT_SECONDS):
                raise StreamCancelledError("the request stream stalled; nothing was stored")
            self.check_live()  # stopped because the call ended
        if self._filling is not None and self._filling.cancelled():
            raise StreamCancelledError("the call was cancelled; nothing was stored")
        if self._held:
            item = self._held[0]
            if item is not _END:  # the end stays: a later next() ends again
                self._held.popleft()
            if isinstance(item, _Raised):
                raise item.error
        else:
            future = asyncio.run_coroutine_threadsafe(self._next(), self._loop)
            item = future.result(timeout=IDLE_TIMEOUT_SECONDS)
        if item is _END:
            raise StopIteration
        return item  # type: ignore[return-value]  # _END and _Raised are the only non-T


class ThreadToLoop(Generic[T]):
    """Items from one worker thread to the event loop, in order, ``depth`` at most in
    flight; the end and the worker's error travel the same way, so no caller needs a
    sentinel of its own. ``run_in_thread`` is how it is used.

    The consumer leaving (the client went away, the call was cancelled) or the loop
    closing (the server is shutting down) sets ``gone``: the worker's next ``put`` says
    so, and a worker that reports progress stops there.
    """

    def __init__(self, depth: int | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._items: asyncio.Queue[tuple[object, BaseException | None]] = asyncio.Queue()
        self._slots = threading.Semaphore(depth) if depth else None
        self._gone = threading.Event()

    @property
    def gone(self) -> bool:
        """Whether the consumer has stopped reading (or the loop closed)."""
        return self._gone.is_set()

    def put(self, item: T) -> bool:
        """From the worker: hand ``item`` over, waiting while ``depth`` items are in
        flight; False once the consumer has gone (the worker should stop)."""
        if self._slots is not None:
            self._slots.acquire()
        if self._gone.is_set():
            return False
        return self._hand_over(item, None)

    def end(self, error: BaseException | None = None) -> None:
        """From the worker: no more items; ``error`` is raised in the consumer if given."""
        self._hand_over(_END, error)

    def _hand_over(self, item: object, error: BaseException | None) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, (item, error))
        except RuntimeError:  # the loop closed: the server is shutting down
            self._gone.set()
            return False
        return True

    async def get(self) -> object:
        """On the loop: the next item, or ``_END``; the worker's error is raised here."""
        item, error = await self._items.get()
        if error is not None:
            raise error
        if item is not _END and self._slots is not None:
            self._slots.release()
        return item

    def leave(self) -> None:
        """On the loop: the consumer stops reading; a worker waiting for room wakes."""
        self._gone.set()
        if self._slots is not None:
            self._slots.release()


async def run_in_thread(
    work: Callable[[ThreadToLoop[T]], None], *, name: str, depth: int | None = None
) -> AsyncGenerator[T, None]:
    """Yield what ``work`` puts into its channel, ``work`` running in a thread of its own.

    A thread of its own, not the shared pool: a client that stops reading, or a run
    that lasts hours, holds only its own thread, never a worker that record calls, the
    guard and the audit trail need. ``work``'s exception is re-raised here, unchanged.
    Nothing starts until the first item is asked for.
    """
    channel: ThreadToLoop[T] = ThreadToLoop(depth)

    job: futures.Future[None] = futures.Future()
    job.set_running_or_notify_cancel()  # so awaiting it below can never cancel it
    track(job)  # counted under the caller's call until the thread ends

    def run() -> None:
        try:
            work(channel)
        except BaseException as e:  # noqa: BLE001  (handed to the consumer)
            channel.end(e)
        else:
            channel.end()
        finally:
            job.set_result(None)

    # In the caller's context: the call's id in log lines, its deadline in the store.
    context = contextvars.copy_context()
    try:
        threading.Thread(target=context.run, args=(run,), name=name, daemon=True).start()
    except BaseException:
        job.set_result(None)  # never ran: not the call's any more (its slot comes back)
        raise
    try:
        while True:
            try:
                item = await channel.get()
            except Exception:
                await asyncio.wrap_future(job)  # the worker raised: its thread is ending
                raise
            if item is _END:
                break
            yield item  # type: ignore[misc]  # only _END is not a T
        # The thread handed its end over and is ending: wait for it, so the call's slot
        # (held until its last job ends, service.edge) is back before the client hears
        # the status; a caller with a share of one may send its next call at once.
        await asyncio.wrap_future(job)
    finally:
        channel.leave()


def prefetch(make: Callable[[], Iterator[T]], depth: int = 2) -> AsyncGenerator[T, None]:
    """Yield the items of ``make()``, produced in a worker thread up to ``depth`` ahead.

    Errors of the producer are re-raised here. If the consumer stops early (the client
    went away), the producer stops at its next item and closes its iterator.
    """

    def produce(channel: ThreadToLoop[T]) -> None:
        iterator = make()
        try:
            for item in iterator:
                if not channel.put(item):
                    return
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    return run_in_thread(produce, name="prefetch", depth=depth)
