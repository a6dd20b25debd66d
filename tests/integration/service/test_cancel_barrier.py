"""The barrier a put passes before it commits (``SyncRequests.confirm_live``), against
grpc itself.

grpc aio ends a cancelled call's request stream exactly like a client's half-close and
cancels the handler separately, later (up to 16 ms under load here). A worker that
took that end for the content's end, and checked the call once more through the loop,
still committed now and then: CI's `test_cancelled_put` found a cancelled put stored.
The barrier reads the stream once more past its end and waits for that read: grpc
answers it at once on a live call (the end again), and does not answer it on a
cancelled call before the handler is cancelled. This test holds grpc to that, with a
worker that commits the moment the stream ends (the narrowest window), cancels at
several points, and calls that finish, side by side from several clients.

Without the barrier (the hop through the loop alone) this passes on an idle machine and
fails under load: beside six busy processes it stored 3 of 320 cancelled calls in one of
two runs. With the barrier, five such runs (1,600 cancelled calls) stored none.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent import futures

import grpc
import pytest
from grpc import aio

from service.streams import StreamCancelledError, SyncRequests

pytestmark = pytest.mark.timeout(120)


async def _at_end(context: aio.ServicerContext) -> bool:
    return await context.read() is aio.EOF


def _sync(requests: AsyncIterator[bytes], context: aio.ServicerContext) -> SyncRequests[bytes]:
    """The put's bridge, as ``RecordServicer.PutRecord`` builds it (on the handler's task)."""
    task = asyncio.current_task()
    return SyncRequests(
        requests,
        asyncio.get_running_loop(),
        lambda: task is not None and task.cancelling() > 0,
        probe=lambda: _at_end(context),
    )


async def _start(
    put: Callable[[AsyncIterator[bytes], aio.ServicerContext], Awaitable[bytes]],
    service: str = "barrier.Test",
    method: str = "Put",
) -> tuple[aio.Server, int]:
    """An aio server on a free local port with ``put`` as its one stream-unary method."""
    server = aio.server()
    handler = grpc.stream_unary_rpc_method_handler(put)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service, {method: handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


METHOD = "/barrier.Test/Put"
CLIENTS = 8
ROUNDS = 40  # per client: a cancelled call and a finished one per round
DELAYS = (0.0, 0.0005, 0.002, 0.01)  # where the cancellation lands; asserts nothing


class StoppedError(Exception):
    """Ends a request iterator: grpc then cancels the call, it never half-closes."""


class Ledger:
    """What the workers committed and refused, by call name."""

    def __init__(self) -> None:
        self.committed: set[bytes] = set()
        self.refused: set[bytes] = set()
        self.lock = threading.Lock()


async def _serve(ledger: Ledger) -> tuple[aio.Server, int]:
    async def put(requests: AsyncIterator[bytes], context: aio.ServicerContext) -> bytes:
        name = await anext(requests)
        sync = _sync(requests, context)

        def work() -> None:
            for _ in sync:
                pass
            try:
                sync.confirm_live()
            except StreamCancelledError:
                with ledger.lock:
                    ledger.refused.add(name)
                return
            with ledger.lock:
                ledger.committed.add(name)

        try:
            await asyncio.to_thread(work)
        except asyncio.CancelledError:
            sync.abandon()
            raise
        return b"stored"

    return await _start(put)


def _stream(name: bytes, hold: threading.Event | None) -> Iterator[bytes]:
    yield name
    yield from (b"", b"synthetic content " * 20, b"")
    if hold is not None:
        hold.wait(30)
        raise StoppedError


def _client(port: int, who: int) -> tuple[set[bytes], set[bytes]]:
    """Returns the names of the calls it cancelled and of those answered OK."""
    cancelled: set[bytes] = set()
    finished: set[bytes] = set()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        put = channel.stream_unary(METHOD)
        for i in range(ROUNDS):
            name = f"cancelled-{who}-{i}".encode()
            hold = threading.Event()
            future = put.future(_stream(name, hold), timeout=30)
            threading.Event().wait(DELAYS[i % len(DELAYS)])
            future.cancel()
            hold.set()
            cancelled.add(name)
            with pytest.raises((grpc.FutureCancelledError, grpc.RpcError)):
                future.result()
            name = f"finished-{who}-{i}".encode()
            assert put(_stream(name, None), timeout=30) == b"stored"
            finished.add(name)
    return cancelled, finished


def test_no_cancelled_stream_passes_the_barrier_and_every_finished_one_does() -> None:
    ledger = Ledger()

    async def main() -> tuple[set[bytes], set[bytes]]:
        server, port = await _serve(ledger)
        loop = asyncio.get_running_loop()
        # The clients' threads are their own: the server's workers use the default pool.
        try:
            with futures.ThreadPoolExecutor(CLIENTS) as clients:
                runs = await asyncio.gather(
                    *(loop.run_in_executor(clients, _client, port, who) for who in range(CLIENTS))
                )
        finally:
            await server.stop(5)
        return set().union(*(c for c, _ in runs)), set().union(*(f for _, f in runs))

    cancelled, finished = asyncio.run(main())
    stored_cancelled = len(ledger.committed & cancelled)
    assert stored_cancelled == 0, f"{stored_cancelled} of {len(cancelled)} cancelled calls"
    assert ledger.committed == finished, (
        f"{len(ledger.committed)} committed of {len(finished)} finished calls"
    )
    # The workers of cancelled calls that reached the end of their stream were refused:
    # the check ran, it was not skipped by a worker that never got there.
    assert ledger.refused <= cancelled
    assert ledger.refused, "no cancelled call reached the barrier: nothing was tested"


def test_a_finished_call_passes_the_barrier_again() -> None:
    """A put whose commit meets a retired KEK version wraps its key again and commits
    once more (``RecordWriter._insert``), passing the barrier a second time. The first
    barrier sent the call's initial metadata, which grpc refuses to send twice: the
    retry of a live, finished put failed with CANCELLED and stored nothing (review
    11a). The barrier now reads past the stream's end, which a live call answers again."""
    passes: list[str] = []

    async def main() -> bytes:
        async def put(requests: AsyncIterator[bytes], context: aio.ServicerContext) -> bytes:
            sync = _sync(requests, context)

            def work() -> None:
                for _ in sync:
                    pass
                for attempt in ("first", "retry"):
                    try:
                        sync.confirm_live()
                    except StreamCancelledError:
                        passes.append(f"{attempt} refused")
                        return
                    passes.append(f"{attempt} passed")

            await asyncio.to_thread(work)
            return b"stored"

        server, port = await _start(put)
        try:
            async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply: bytes = await channel.stream_unary(METHOD)(iter([b"n", b"c"]), timeout=30)
                return reply
        finally:
            await server.stop(5)

    assert asyncio.run(main()) == b"stored"
    assert passes == ["first passed", "retry passed"], passes


def test_an_unavailable_commit_is_retried_by_the_clis_retry_policy() -> None:
    """The CLI's channel retries PutRecord on UNAVAILABLE (``service.cli.targets``): a
    put whose commit found the database down is sent again, safely (its request_id).
    Here the first commit fails with UNAVAILABLE after the barrier, the second works.
    A barrier that sent the call's headers broke this (review 11a): a gRPC client never
    retries a call once headers arrived (gRFC A6)."""
    from service.cli.targets import parse  # noqa: PLC0415  (the CLI's channel options)

    attempts: list[int] = []

    async def main() -> bytes | grpc.StatusCode:
        async def put(requests: AsyncIterator[bytes], context: aio.ServicerContext) -> bytes:
            sync = _sync(requests, context)

            def work() -> None:
                for _ in sync:
                    pass
                sync.confirm_live()

            await asyncio.to_thread(work)
            attempts.append(1)
            if len(attempts) == 1:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the database is unavailable")
            return b"stored"

        server, port = await _start(put, "medvault.v1.RecordService", "PutRecord")
        target = parse(f"127.0.0.1:{port}")
        options = [o for o in target.options() if o[0] != "grpc.default_authority"]
        try:
            async with aio.insecure_channel(target.target, options=options) as channel:
                put_record = channel.stream_unary("/medvault.v1.RecordService/PutRecord")
                try:
                    reply: bytes = await put_record(iter([b"header", b"content"]), timeout=30)
                except aio.AioRpcError as e:
                    return e.code()
                return reply
        finally:
            await server.stop(5)

    assert asyncio.run(main()) == b"stored"
    assert len(attempts) == 2
