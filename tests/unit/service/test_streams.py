"""The one thread-to-loop bridge (``service.streams.run_in_thread``), tested once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from service.streams import ThreadToLoop, prefetch, run_in_thread

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
