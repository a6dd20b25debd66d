"""Per-method call metrics in the Prometheus format operators already scrape, and the
call id that ties a client's error to the service's log lines.

``medvault_rpc_calls_total{method, code}`` counts finished calls by method and final
status; ``medvault_rpc_seconds{method}`` is their latency histogram (from the handler's
start to its last message); ``medvault_rpc_received_bytes_total{method}`` and
``medvault_rpc_sent_bytes_total{method}`` count serialized message bytes in and out
(protobuf payloads, before gRPC's framing and TLS). Served on ``server.metrics_listen``
with the incident and witness counters. The method label is the registered name
(``RecordService/GetRecord``); a name no service registers is counted as ``other``:
callers choose method names, and a label per name would let them grow the server's
memory and the scrape without bound.
No label carries a principal, patient or record.

Each call gets a random id (``service.logs.CALL_ID``): every log line made while serving
it carries it as ``call``, and the client receives it in the ``x-medvault-call`` trailing
metadata (shown by the CLI with an error), so support can find the call in the log
without the client sending anything identifying.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from grpc import aio
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from service.logs import CALL_ID, new_call_id
from storage import RunLedger, ScheduledRun

CALLS = Counter(
    "medvault_rpc_calls_total", "Finished gRPC calls by method and status code",
    ["method", "code"],
)  # fmt: skip
LATENCY = Histogram(
    "medvault_rpc_seconds", "gRPC call duration by method (handler start to end)",
    ["method"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)  # fmt: skip
RECEIVED = Counter(
    "medvault_rpc_received_bytes_total", "Serialized request bytes received, by method",
    ["method"],
)  # fmt: skip
SENT = Counter(
    "medvault_rpc_sent_bytes_total", "Serialized response bytes sent, by method", ["method"]
)
OTHER = "other"
CALL_TRAILER = "x-medvault-call"


def _begin(context: aio.ServicerContext) -> float:
    """Give the call its id (log lines, trailer) and return its start time."""
    call = new_call_id()
    CALL_ID.set(call)  # each call runs in a task of its own, with its own context
    context.set_trailing_metadata(((CALL_TRAILER, call),))
    return time.perf_counter()


def _code(context: aio.ServicerContext, error: BaseException | None) -> str:
    """The call's final status: what the handler set, else OK or (on an exception) UNKNOWN."""
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"  # the client went away or its deadline passed
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):  # grpc.aio reports the cygrpc integer on some paths
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return str(status.name)
    return "UNKNOWN" if error is not None else "OK"


class MetricsInterceptor(aio.ServerInterceptor):  # type: ignore[misc]  # untyped base
    """Outermost interceptor: times each call and counts it by method and final code."""

    def __init__(self, registered: frozenset[str]) -> None:
        self._registered = registered

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        full = str(details.method)
        label = full.rsplit(".", 1)[-1] if full in self._registered else OTHER
        return _timed(handler, label)


def _counted_in(deserializer: Callable[[bytes], Any] | None, label: str) -> Callable[[bytes], Any]:
    """The request deserializer, counting each message's wire size first (so a message
    that fails to parse is counted too: it was received)."""
    received = RECEIVED.labels(label)

    def deserialize(data: bytes) -> Any:
        received.inc(len(data))
        return deserializer(data) if deserializer is not None else data

    return deserialize


def _counted_out(serializer: Callable[[Any], bytes] | None, label: str) -> Callable[[Any], bytes]:
    """The response serializer, counting each message's wire size."""
    sent = SENT.labels(label)

    def serialize(message: Any) -> bytes:
        data: bytes = serializer(message) if serializer is not None else message
        sent.inc(len(data))
        return data

    return serialize


def _timed(handler: grpc.RpcMethodHandler, label: str) -> grpc.RpcMethodHandler:
    unary, stream = _unary_response(label), _stream_response(label)
    common = {
        "request_deserializer": _counted_in(handler.request_deserializer, label),
        "response_serializer": _counted_out(handler.response_serializer, label),
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **common)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), **common)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **common)
    return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), **common)


def _finish(label: str, started: float, context: aio.ServicerContext,
            error: BaseException | None) -> None:  # fmt: skip
    LATENCY.labels(label).observe(time.perf_counter() - started)
    CALLS.labels(label, _code(context, error)).inc()


def _unary_response(label: str) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Any]]:
    def unary_response(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        async def wrapped(request: Any, context: aio.ServicerContext) -> Any:
            started, error = _begin(context), None
            try:
                return await behavior(request, context)
            except BaseException as e:
                error = e
                raise
            finally:
                _finish(label, started, context, error)

        return wrapped

    return unary_response


def _stream_response(
    label: str,
) -> Callable[[Callable[..., AsyncIterator[Any]]], Callable[..., Any]]:
    def stream_response(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
        async def wrapped(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            started, error = _begin(context), None
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as e:
                error = e
                raise
            finally:
                _finish(label, started, context, error)

        return wrapped

    return stream_response


class ScheduledRunsCollector:
    """Backup and drill health from the run ledger, read at each scrape.

    Only authentic rows count (their MAC verified, ``ScheduledRun.auth``): a row a
    database writer forged, copied from another slot or kind, or wrote before migration
    0015 is no result.
    ``medvault_backup_last_success_timestamp_seconds``: when the newest scheduled backup
    that succeeded finished (absent if none did); an operator alerts on its age.
    ``medvault_drill_last_result``: 1 if the newest finished scheduled restore drill
    passed, 0 if it failed or a forged drill row is among those read (absent if neither),
    with its end time in ``medvault_drill_last_timestamp_seconds``.
    ``medvault_run_ledger_forged_rows``: rows read whose MAC failed or that hold a value
    medvault never writes (legacy rows without a MAC are not counted). Manual runs
    (``medvault backup run``) are in the audit trail, not the ledger. A scrape that
    cannot read the ledger (or the token) reports ``medvault_run_ledger_up 0`` instead
    of failing the whole scrape.
    """

    def __init__(self, ledger: RunLedger) -> None:
        self._ledger = ledger

    def collect(self) -> Iterator[Metric]:
        """The gauges, from the newest runs of each kind."""
        up = GaugeMetricFamily("medvault_run_ledger_up", "Whether the run ledger was read")
        try:
            backups = self._ledger.list("backup", limit=200)
            drills = self._ledger.list("drill", limit=50)
        except Exception:  # noqa: BLE001  (a database or token outage: reported, never raised)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        forged = GaugeMetricFamily(
            "medvault_run_ledger_forged_rows",
            "Run ledger rows read that failed authentication (written without the token)",
        )
        forged.add_metric([], sum(r.auth == "forged" for r in (*backups, *drills)))
        yield forged
        yield from _backup_gauges(backups)
        yield from _drill_gauges(drills)


def _backup_gauges(backups: list[ScheduledRun]) -> Iterator[Metric]:
    ok = [r.finished_at for r in backups if r.auth == "authentic" and r.outcome == "ok"]
    ends = [end for end in ok if end is not None]
    if ends:
        last = GaugeMetricFamily(
            "medvault_backup_last_success_timestamp_seconds",
            "End time of the newest scheduled backup that succeeded (Unix seconds)",
        )
        last.add_metric([], max(ends).timestamp())
        yield last


def _drill_gauges(drills: list[ScheduledRun]) -> Iterator[Metric]:
    done = [
        r for r in drills
        if r.auth == "authentic" and r.outcome in ("ok", "failed") and r.finished_at
    ]  # fmt: skip
    # A forged row (a MAC that fails, a value medvault never writes) may stand where the
    # newest drill was: no pass is reported while one is listed, and it is reported as
    # a failure even when no authentic drill is (rather than no gauge at all).
    forged = any(r.auth == "forged" for r in drills)
    if not done and not forged:
        return
    newest = max(done, key=lambda r: r.finished_at or r.started_at) if done else None
    result = GaugeMetricFamily(
        "medvault_drill_last_result", "1 if the newest scheduled drill passed, else 0"
    )
    result.add_metric([], 1 if newest and newest.outcome == "ok" and not forged else 0)
    yield result
    if newest is not None:
        when = GaugeMetricFamily(
            "medvault_drill_last_timestamp_seconds",
            "End time of the newest scheduled drill (Unix seconds)",
        )
        when.add_metric([], (newest.finished_at or newest.started_at).timestamp())
        yield when
