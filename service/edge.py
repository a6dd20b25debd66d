"""The edge: what every call goes through before its handler sees a message.

One interceptor wraps every method of the server, so no handler repeats it:

1. Authenticate and authorise first, from the TLS auth context and the metadata, before
   waiting for any message (a caller with no role is refused at once, and audited).
2. Hold one of the principal's call slots (``service.limits``) for the whole call, and
   until the last of its jobs in worker threads has ended; the client's deadline bounds
   those jobs' S3, SQL and token steps (``service.call_scope``, ``storage.deadlines``).
3. Read the request messages under deadlines: the first within
   ``first_message_seconds``, each later one within ``idle_seconds``; a silent stream
   ends with DEADLINE_EXCEEDED, audited as failed.
4. Decode them here (``service.wire``): corrupt messages, invalid UTF-8 and NULs in
   text become INVALID_ARGUMENT naming the field, audited.

Unary-request methods are served as request streams of one message: grpc would
otherwise wait for the message before any handler runs, out of reach of steps 1-3.
The wire format is the same, so clients see no difference.

grpc.aio interceptors do not see the TLS auth context, but the handler's context does,
so the interceptor replaces each method's behaviour with one that does the above with
the context it is given, then calls the servicer's own. The entered ``Call`` reaches the
servicer's ``handled`` block through a context variable (each call runs in its own task).
Health and reflection need no role; they are held to the certificate's share only.

A method no service registers (UNIMPLEMENTED) is still a call: the interceptor answers it
itself, after authenticating the caller and within the caller's share, with one denied
event (``server.unknown_method``) naming the method, normalised (the caller chose it).
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from service.authn import Principal
from service.call_scope import CALL_SCOPE, CallScope
from service.calls import CURRENT_CALL, CallState, audit_job, facts, handled
from service.guard import AccessGuard, Refusal, source_host
from service.limits import CallLimiter, Refusals, StreamDeadlineError, TooManyCallsError
from service.wire import Rejected, decode
from storage import CallDeadline, InvalidRecordError, set_deadline

_MEDVAULT = "/medvault.v1."
CALL_LIMIT_ACTION = "server.call_limit"
UNKNOWN_METHOD_ACTION = "server.unknown_method"
UNKNOWN_METHOD = "no such method; see the medvault.v1 protos for the services and methods"
_METHOD_UNSAFE = re.compile(r"[^A-Za-z0-9_./-]")
_METHOD_MAX = 120  # characters of a caller-chosen method name kept in the trail
Behavior = Callable[[Any, aio.ServicerContext], Any]


@dataclass(frozen=True, slots=True)
class Deadlines:
    """How long the server waits for a stream's first message, then for each next one;
    and the slowest average a request stream may keep up after its first ``idle_seconds``
    (bytes per second, 0 = no floor)."""

    first_message_seconds: float
    idle_seconds: float
    min_bytes_per_second: int = 0


class Messages:
    """A call's request stream, read under deadlines, refused messages raised.

    The idle deadline alone lets a client trickle a byte per ``idle_seconds`` and hold
    its upload slot (``server.max_uploads``) for ever; so, after a grace of
    ``idle_seconds``, each next message is awaited only as long as the bytes received
    so far buy at ``min_bytes_per_second``.
    """

    def __init__(self, source: AsyncIterator[Any], deadlines: Deadlines) -> None:
        self._source = source
        self._deadlines = deadlines
        self._received = 0
        self._bytes = 0
        self._start = asyncio.get_running_loop().time()

    def __aiter__(self) -> Messages:
        return self

    def _timeout(self) -> tuple[float, str]:
        """How long to wait for the next message, and the error if it does not come."""
        d = self._deadlines
        if self._received == 0:
            return d.first_message_seconds, (
                f"no first request message within {d.first_message_seconds:g} s "
                "(server.first_message_seconds); send messages without pausing"
            )
        if d.min_bytes_per_second:
            earned = d.idle_seconds + self._bytes / d.min_bytes_per_second
            left = self._start + earned - asyncio.get_running_loop().time()
            if left < d.idle_seconds:
                return max(left, 0.0), (
                    f"request stream slower than {d.min_bytes_per_second} bytes/s on average "
                    "(server.min_upload_bytes_per_second); send faster"
                )
        return d.idle_seconds, (
            f"no next request message within {d.idle_seconds:g} s (server.idle_seconds); "
            "send messages without pausing"
        )

    async def __anext__(self) -> Any:
        timeout, message = self._timeout()
        try:
            # Not wait_for: in Python 3.11 it returns a read that completed as the task
            # was cancelled and drops the cancellation, and grpc ends a cancelled call's
            # stream and cancels its handler at the same moment: the handler would take
            # the end for the client's and commit (tests/integration/access/
            # test_cancelled_put.py).
            async with asyncio.timeout(timeout):
                item = await anext(self._source)
        except TimeoutError as e:
            raise StreamDeadlineError(message) from e
        self._received += 1
        if isinstance(item, Rejected):
            raise item.error
        self._bytes += item.ByteSize()
        return item

    async def single(self) -> Any:
        """The one message of a unary request."""
        try:
            return await anext(self)
        except StopAsyncIteration as e:
            raise InvalidRecordError("request", "missing: the call ended before its message") from e


def refusal_reporter(guard: AccessGuard) -> Callable[[Refusals], None]:
    """Writes one closed window of refusals as one denied audit event."""

    def report(refusals: Refusals) -> None:
        guard.audit_as(
            refusals.principal, CALL_LIMIT_ACTION, refusals.resource, outcome="denied",
            status="RESOURCE_EXHAUSTED", reason=refusals.reason,
        )  # fmt: skip

    return report


def _certificate_principal(context: aio.ServicerContext) -> Principal:
    """The caller of a method that needs no role: its certificate CN, else its address."""
    names = context.auth_context().get("x509_common_name") or []
    name = names[0].decode(errors="replace") if names else context.peer()
    return Principal(name, None, frozenset(), context.peer())


def method_name(raw: str) -> str:
    """A caller-chosen method path made safe for the trail: unusual characters become
    ``?`` and a long name is cut (the trail normalises too; this keeps the resource short
    and readable)."""
    name = _METHOD_UNSAFE.sub("?", raw)
    return name if len(name) <= _METHOD_MAX else name[:_METHOD_MAX] + "...[cut]"


class EdgeInterceptor(aio.ServerInterceptor):  # type: ignore[misc]  # untyped base
    """Wraps every method's behaviour with entry, limits, deadlines and decoding."""

    def __init__(self, guard: AccessGuard, limiter: CallLimiter, deadlines: Deadlines) -> None:
        self._guard = guard
        self._limiter = limiter
        self._deadlines = deadlines

    async def flush(self) -> None:
        """Audit the refusal windows still open (at shutdown)."""
        await self._limiter.flush()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:  # registered nowhere: answered here, so it is audited
            return self._unknown_handler(method_name(details.method))
        if details.method.startswith(_MEDVAULT):
            return self._entered_handler(handler, details.method)
        return self._limited_handler(handler)

    @asynccontextmanager
    async def _entered(self, context: aio.ServicerContext, method: str) -> AsyncIterator[CallState]:
        """Enter, hold a slot, map and audit errors of the edge itself."""
        rpc = method.rsplit("/", 1)[-1]
        async with handled(self._guard, context, rpc, expiry=False) as state:
            state.resource = method
            # Admitted on the loop (memory only); a worker thread only to audit a refusal.
            admitted = self._guard.admit(facts(context, method))
            if isinstance(admitted, Refusal):
                # Decided already (a one-time token is spent): audit_job writes its event
                # even if the call ends while the job waits for a free thread.
                await audit_job(self._guard.audit_refusal, admitted)
                raise admitted.exception()
            call = state.call = admitted
            release = self._limiter.acquire(call.principal)
            # The client's deadline bounds the store's work for the call (service.call_scope).
            scope = CallScope(CallDeadline.within(context.time_remaining()))
            # No reset: each call runs in a task of its own, with its own context.
            CURRENT_CALL.set(call)
            CALL_SCOPE.set(scope)
            state.scope = scope
            set_deadline(scope.deadline)  # no reset either: see CURRENT_CALL
            try:
                yield state
            finally:
                scope.deadline.stop()  # what still runs for it stops at its next step
                scope.after_jobs(release)  # the slot is the principal's until then

    def _entered_handler(self, handler: grpc.RpcMethodHandler, method: str) -> Any:
        single = not handler.request_streaming
        behavior: Behavior = (
            handler.unary_unary or handler.unary_stream or handler.stream_unary
            or handler.stream_stream
        )  # fmt: skip
        deserializer = functools.partial(decode, handler.request_deserializer.__self__)

        async def requests(source: AsyncIterator[Any]) -> Any:
            messages = Messages(source, self._deadlines)
            return await messages.single() if single else messages

        if handler.response_streaming:

            async def streaming(source: AsyncIterator[Any], context: aio.ServicerContext) -> Any:
                async with self._entered(context, method):
                    # aclosing: a client that goes away stops the handler now, not at GC.
                    replies = behavior(await requests(source), context)
                    async with aclosing(replies):
                        async for reply in replies:
                            yield reply

            return grpc.stream_stream_rpc_method_handler(
                streaming, deserializer, handler.response_serializer
            )

        async def unary(source: AsyncIterator[Any], context: aio.ServicerContext) -> Any:
            async with self._entered(context, method):
                return await behavior(await requests(source), context)
            raise AssertionError("unreachable")  # pragma: no cover  (abort raised)

        return grpc.stream_unary_rpc_method_handler(
            unary, deserializer, handler.response_serializer
        )

    def _unknown_handler(self, name: str) -> Any:
        """UNIMPLEMENTED, after authentication, within the caller's share, audited once.

        A caller that fails authentication gets the same audited refusal as on any
        method; one over its share gets RESOURCE_EXHAUSTED (summarised per window). So an
        unknown method writes no more events than a known method refused to that caller.
        The request stream is never read.
        """

        async def unknown(_source: AsyncIterator[Any], context: aio.ServicerContext) -> Any:
            async with handled(self._guard, context, UNKNOWN_METHOD_ACTION) as state:
                state.resource = name
                principal = await asyncio.to_thread(self._guard.identify, facts(context, name))
                with self._limiter.slot(principal):
                    await audit_job(self._refuse_unknown, principal, name)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, UNKNOWN_METHOD)

        # No deserializer: the request bytes are never decoded (nor read).
        return grpc.stream_unary_rpc_method_handler(unknown)

    def _refuse_unknown(self, principal: Principal, name: str) -> None:
        self._guard.audit_as(
            principal, UNKNOWN_METHOD_ACTION, name, outcome="denied", status="UNIMPLEMENTED",
            reason=UNKNOWN_METHOD,
        )  # fmt: skip
        # Probing for methods counts as a denial in the source's incident window.
        self._guard.incidents.denied(source_host(principal.source))

    async def _certificate_slot(self, context: aio.ServicerContext) -> Callable[[], None]:
        try:
            return self._limiter.acquire(_certificate_principal(context))
        except TooManyCallsError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            raise  # pragma: no cover  (abort raised)

    def _limited_handler(self, handler: grpc.RpcMethodHandler) -> Any:
        """Health and reflection: the certificate's share of calls, nothing else."""
        if handler.response_streaming:
            inner_stream: Behavior = handler.unary_stream or handler.stream_stream

            async def streaming(request: Any, context: aio.ServicerContext) -> Any:
                release = await self._certificate_slot(context)
                try:
                    async with aclosing(inner_stream(request, context)) as replies:
                        async for reply in replies:
                            yield reply
                finally:
                    release()

            make = (
                grpc.unary_stream_rpc_method_handler if handler.unary_stream
                else grpc.stream_stream_rpc_method_handler
            )  # fmt: skip
            return make(streaming, handler.request_deserializer, handler.response_serializer)

        inner: Behavior = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: aio.ServicerContext) -> Any:
            release = await self._certificate_slot(context)
            try:
                return await inner(request, context)
            finally:
                release()

        make = (
            grpc.unary_unary_rpc_method_handler if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )  # fmt: skip
        return make(unary, handler.request_deserializer, handler.response_serializer)
