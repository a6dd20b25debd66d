"""The one thread-to-loop bridge (``service.streams.run_in_thread``), tested once."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import types
from collections.abc import Iterator
from concurrent import futures

import pytest

from service import streams
from service._gen.medvault.v1 import records_pb2 as pb
from service.call_scope import CALL_SCOPE, CallScope
from service.records_servicer import wire_size
from service.streams import (
    PREFILL_MESSAGES,
    StreamCancelledError,
    SyncRequests,
    ThreadToLoop,
    prefetch,
    run_in_thread,
)
from storage import CallDeadline

WAIT = 30.0  # a bound on waiting for another thread, never a measured duration


def test_items_arrive_in_order_then_the_end() -> None:
    def work(channel: ThreadToLoop[int]) -> None:
        for i in range(100):
            channel.put(i)

    async def main() -> list[int]:
        return [i async for i in run_in_thread(work, name="t", depth=3)]

    assert asyncio.run(main()) == list(range(100))


def test_the_workers_error_is_raised_unchanged_after_its_items() -> None:
    failure = OSError("object store unreachable")
    seen: list[str] = []

    def work(channel: ThreadToLoop[str]) -> None:
        channel.put("progress")
        raise failure

    async def main() -> None:
        async for item in run_in_thread(work, name="t"):
            seen.append(item)

    with pytest.raises(OSError, match="unreachable") as caught:
        asyncio.run(main())
    assert caught.value is failure
    assert seen == ["progress"]


class _SlowEnd(futures.Future[None]):
    """A job whose thread is descheduled between handing its end over and ending: what
    a busy host does to it now and then, made certain."""

    def set_result(self, result: None) -> None:
        time.sleep(0.2)
        super().set_result(result)


@pytest.mark.parametrize("fails", [False, True])
def test_the_workers_thread_has_ended_before_the_stream_does(
    monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    """The edge gives a call's slot back once its jobs have ended; the stream's status
    goes out when the generator ends. So the job must have ended by then, or a caller
    with a share of one is refused its next call (seen in CI)."""
    monkeypatch.setattr(streams, "futures", types.SimpleNamespace(Future=_SlowEnd))

    def work(channel: ThreadToLoop[int]) -> None:
        channel.put(1)
        if fails:
            raise OSError("object store unreachable")

    async def main() -> tuple[list[int], int]:
        scope = CallScope(CallDeadline.within(None))
        CALL_SCOPE.set(scope)
        released: list[int] = []
        items: list[int] = []
        with contextlib.suppress(OSError):
            async for item in run_in_thread(work, name="t"):
                items.append(item)
        scope.after_jobs(lambda: released.append(1))
        return items, len(released)

    assert asyncio.run(main()) == ([1], 1), "the slot was still held when the stream ended"


class _NoThread(threading.Thread):
    """A host out of threads (or memory): ``start`` refuses."""

    def start(self) -> None:
        raise RuntimeError("can't start new thread")


def test_a_thread_that_cannot_start_leaves_no_job_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The job is counted under the call before its thread starts. A thread that could
    not start left it counted for ever: the principal's call slot (given back once the
    call's last job ends) was never given back, and the jobs gauge never went down."""
    monkeypatch.setattr(streams, "threading", types.SimpleNamespace(
        Thread=_NoThread, Event=threading.Event, Semaphore=threading.Semaphore,
    ))  # fmt: skip

    async def main() -> int:
        scope = CALL_SCOPE.set(CallScope(CallDeadline.within(None)))
        released: list[int] = []
        with pytest.raises(RuntimeError, match="new thread"):
            async for _ in run_in_thread(lambda channel: None, name="t"):
                pass
        call = CALL_SCOPE.get()
        assert call is not None
        call.after_jobs(lambda: released.append(1))
        CALL_SCOPE.reset(scope)
        return len(released)

    assert asyncio.run(main()) == 1, "the call's slot stayed held"


def test_a_consumer_that_leaves_stops_the_worker_and_closes_its_source() -> None:
    closed = threading.Event()

    def source() -> Iterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    async def main() -> list[int]:
        taken = []
        stream = prefetch(source, depth=2)
        async for item in stream:
            taken.append(item)
            if len(taken) == 3:
                break
        await stream.aclose()
        return taken

    assert asyncio.run(main()) == [0, 1, 2]
    assert closed.wait(WAIT), "the producer kept its source open after the consumer left"


def test_the_worker_runs_at_most_depth_items_ahead() -> None:
    depth = 2
    trying = [threading.Event() for _ in range(depth + 2)]
    handed = [threading.Event() for _ in range(depth + 2)]

    def work(channel: ThreadToLoop[int]) -> None:
        for i in range(depth + 2):
            trying[i].set()
            if not channel.put(i):
                return
            handed[i].set()

    async def main() -> tuple[int, bool, bool]:
        stream = run_in_thread(work, name="t", depth=depth)
        first = await anext(stream)  # the worker starts; item 0 taken, its slot freed
        # Items 1..depth are in flight; the put after them waits for room.
        reached = await asyncio.to_thread(trying[depth + 1].wait, WAIT)
        held = handed[depth].is_set() and not handed[depth + 1].is_set()
        await stream.aclose()
        return first, reached, held

    first, reached, held = asyncio.run(main())
    assert first == 0
    assert reached
    assert held


def test_put_reports_a_consumer_that_has_gone() -> None:
    answers: list[bool] = []
    left, finished = threading.Event(), threading.Event()

    def work(channel: ThreadToLoop[int]) -> None:
        answers.append(channel.put(1))
        left.wait(WAIT)
        answers.append(channel.put(2))
        finished.set()

    async def main() -> None:
        stream = run_in_thread(work, name="t")
        assert await anext(stream) == 1
        await stream.aclose()
        left.set()

    asyncio.run(main())
    # The worker's second put ran after the consumer left: it is told so. (The loop may
    # also have closed by then, which reads the same to the worker.)
    assert finished.wait(WAIT)
    assert answers == [True, False]


# --- SyncRequests: the other way, a worker pulling request messages from the loop -------


class _Source:
    """An async request stream that counts the reads asked of it (the end included)."""

    def __init__(self, items: list[bytes], error: Exception | None = None) -> None:
        self.items = items
        self.error = error
        self.calls = 0

    def __aiter__(self) -> _Source:
        return self

    async def __anext__(self) -> bytes:
        self.calls += 1
        if self.calls <= len(self.items):
            return self.items[self.calls - 1]
        if self.error is not None:
            raise self.error
        raise StopAsyncIteration


def _drain_in_worker(source: _Source, max_bytes: int) -> tuple[list[bytes], int, int]:
    """Prefill on the loop, then iterate to the end in a worker thread: (the items, reads
    made by prefill, reads the worker had to ask of the loop)."""

    async def main() -> tuple[list[bytes], int]:
        requests = SyncRequests(source, asyncio.get_running_loop())
        await requests.prefill(max_bytes, len)
        on_loop = source.calls
        return await asyncio.to_thread(list, requests), on_loop

    items, on_loop = asyncio.run(main())
    return items, on_loop, source.calls - on_loop


def test_a_small_stream_is_read_whole_on_the_loop() -> None:
    items, on_loop, from_worker = _drain_in_worker(_Source([b"a" * 10, b"b" * 10]), 100)
    assert items == [b"a" * 10, b"b" * 10]
    assert on_loop == 3  # both messages and the end
    assert from_worker == 0


def test_prefill_stops_at_max_bytes_and_the_worker_reads_the_rest() -> None:
    chunks = [bytes([i]) * 40 for i in range(5)]
    items, on_loop, from_worker = _drain_in_worker(_Source(chunks), 100)
    assert items == chunks
    assert on_loop == 3  # 40 + 40 + 40 >= 100
    assert from_worker == 3  # the two left, then the end


def test_prefill_holds_a_bounded_number_of_empty_messages() -> None:
    source = _Source([b""] * 1000)
    items, on_loop, _ = _drain_in_worker(source, 1 << 20)
    assert on_loop == PREFILL_MESSAGES
    assert items == [b""] * 1000


def test_an_error_met_by_prefill_reaches_the_worker_after_the_items_before_it() -> None:
    failure = ValueError("corrupt request message")
    source = _Source([b"x"], error=failure)

    async def main() -> list[bytes]:
        requests = SyncRequests(source, asyncio.get_running_loop())
        await requests.prefill(100, len)
        got: list[bytes] = []

        def work() -> None:
            for item in requests:
                got.append(item)

        with pytest.raises(ValueError, match="corrupt") as caught:
            await asyncio.to_thread(work)
        assert caught.value is failure
        return got

    assert asyncio.run(main()) == [b"x"]


def test_a_started_prefill_is_awaited_by_the_workers_first_message() -> None:
    """start_prefill reads beside the worker; the worker's first next() takes what it
    held, with no hand-off of its own."""
    release = asyncio.Event()

    class Slow(_Source):
        async def __anext__(self) -> bytes:
            await release.wait()
            return await super().__anext__()

    source = Slow([b"a" * 10, b"b" * 10])

    async def main() -> list[bytes]:
        requests = SyncRequests(source, asyncio.get_running_loop())
        requests.start_prefill(100, len)
        worker = asyncio.ensure_future(asyncio.to_thread(list, requests))
        await asyncio.sleep(0.05)  # the worker is waiting for the read-ahead
        assert not worker.done()
        release.set()
        return await asyncio.wait_for(worker, WAIT)

    assert asyncio.run(main()) == [b"a" * 10, b"b" * 10]
    assert source.calls == 3  # both messages and the end, all read by the prefill


def test_a_stopped_prefill_ends_the_workers_stream_as_cancelled() -> None:
    async def main() -> None:
        requests = SyncRequests(_Silent(asyncio.Event()), asyncio.get_running_loop())
        requests.start_prefill(100, len)
        worker = asyncio.ensure_future(asyncio.to_thread(list, requests))
        await asyncio.sleep(0.05)
        requests.stop_prefill()  # the call ended
        with pytest.raises(StreamCancelledError):
            await asyncio.wait_for(worker, WAIT)

    asyncio.run(main())


class _Silent:
    """A request stream whose client never sends."""

    def __init__(self, never: asyncio.Event) -> None:
        self._never = never

    def __aiter__(self) -> _Silent:
        return self

    async def __anext__(self) -> bytes:
        await self._never.wait()
        raise StopAsyncIteration


def _unknown_field(size: int) -> pb.PutRecordRequest:
    """A PutRecordRequest whose bytes travel in an unknown field (number 15): no chunk."""
    length = bytearray()
    n = size
    while True:  # the length as a protobuf varint
        byte, n = n & 0x7F, n >> 7
        length.append(byte | (0x80 if n else 0))
        if not n:
            break
    return pb.PutRecordRequest.FromString(bytes([15 << 3 | 2]) + bytes(length) + b"u" * size)


def test_prefill_of_put_messages_holds_one_chunk_of_wire_bytes() -> None:
    """A message whose bytes are not in ``chunk`` (unknown fields here; a second header
    likewise) weighs its size on the wire: prefill stops after a chunk's worth, instead
    of holding its 4 messages at grpc's largest size each."""
    messages = [_unknown_field(600) for _ in range(10)]
    assert all(m.chunk == b"" and m.ByteSize() > 600 for m in messages)
    source = _Source(messages)  # type: ignore[arg-type]  # messages here, not bytes

    async def main() -> int:
        requests = SyncRequests(source, asyncio.get_running_loop())
        await requests.prefill(1000, wire_size)  # type: ignore[arg-type]  # messages here
        return source.calls

    assert asyncio.run(main()) == 2  # 2 x 600 wire bytes >= 1000
