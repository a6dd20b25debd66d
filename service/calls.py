"""The shape every RPC handler shares: the entered call, mapped errors, audited failures.

``service.edge`` enters each call (authentication, authorisation, its slot) before the
handler runs and leaves the ``Call`` in ``CURRENT_CALL``; ``handled`` picks it up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from grpc import aio

from service.audit import AuditUnavailableError
from service.authn import AuthenticationError
from service.authz import PermissionDeniedError
from service.call_scope import CALL_SCOPE, CallScope
from service.guard import AccessGuard, Call, CallFacts
from service.limits import TooManyCallsError
from service.status import status_for
from storage import bounded

log = logging.getLogger(__name__)
# Already audited (denials), summarised (over a share) or impossible to audit (trail down).
_NOT_AUDITED_AGAIN = (
    PermissionDeniedError, AuthenticationError, AuditUnavailableError, TooManyCallsError,
)  # fmt: skip
# A cancellation this close to the call's deadline is the deadline: the client's timer
# may fire (and cancel) a moment before the server's.
_EXPIRY_TOLERANCE_SECONDS = 0.25
# How long an expired call's event waits for its worker jobs to stop (``_jobs_ended``);
# a job still running then (a token or database that hangs) is not waited for longer.
_JOBS_WAIT_SECONDS = 5.0
EXPIRED = "the call's deadline passed before it finished; the work done for it was stopped"
# The call the edge entered for the running task (each call runs in a task of its own).
CURRENT_CALL: ContextVar[Call | None] = ContextVar("medvault_current_call", default=None)


def facts(context: aio.ServicerContext, method: str) -> CallFacts:
    """Capture the transport's view of a call (on the event loop)."""
    return CallFacts(
        method=method,
        auth_context=dict(context.auth_context()),
        metadata=tuple(context.invocation_metadata() or ()),
        peer=context.peer(),
    )


@dataclass
class CallState:
    """What a handler knows so far: the entered call and the resource it touches."""

    call: Call | None = None
    resource: str = ""
    scope: CallScope | None = None  # the call's deadline and workers (service.edge)


@asynccontextmanager
async def handled(
    guard: AccessGuard, context: aio.ServicerContext, rpc: str, *, expiry: bool = True
) -> AsyncIterator[CallState]:
    """Map any error to its status code; audit the failure of an allowed call, and (with
    ``expiry``: the servicers' blocks, not the edge's) its end by its deadline."""
    state = CallState(CURRENT_CALL.get(), scope=CALL_SCOPE.get())
    try:
        yield state
    except (asyncio.CancelledError, GeneratorExit):
        # The client went away or its deadline passed: the handler's task is cancelled,
        # or (a stream paused at a reply) the handler is closed. Its work stops now, not
        # once the expiry's event below has committed: a change queued for the audit
        # writer checks the deadline when it runs (SignRecord's signature row), and
        # must not be stored after the call was judged ended.
        if state.scope is not None:
            state.scope.deadline.stop()
        if expiry:
            await _audit_expiry(guard, context, state, rpc)
        raise
    except aio.AbortError:
        raise  # aborted (mapped and audited) by a handled block within
    except Exception as e:  # noqa: BLE001  (every error leaves as a mapped status)
        code, message = status_for(e)
        log.warning("rpc failed", extra={"rpc": rpc, "code": code.name, "error": type(e).__name__})
        if state.call is not None and not isinstance(e, _NOT_AUDITED_AGAIN):
            await audit_job(
                _audit_failure, guard, state.call, state.resource or rpc, code.name, message
            )
        await context.abort(code, message)


async def audit_job(fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn(*args)`` (an audit write) in a pool thread, to its end even if the call is
    cancelled meanwhile: the client cancelling, or its deadline passing, while the job
    still waits for a free thread would otherwise drop it from the queue, and with it
    the event of a refusal already decided."""
    job = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    job.add_done_callback(_settled)
    await asyncio.shield(job)


def _settled(job: asyncio.Future[None]) -> None:
    """Retrieve a detached audit job's error (it is raised to the call if still there)."""
    if not job.cancelled() and (error := job.exception()) is not None:
        log.error("audit of a call's end not written", extra={"error": type(error).__name__})


def _audit_failure(guard: AccessGuard, call: Call, resource: str, code: str, message: str) -> None:
    """Audit a failed call; the call may be over, so its deadline does not bound this."""
    with bounded(None):
        guard.audit_failure(call, resource, code, message)


async def _audit_expiry(
    guard: AccessGuard, context: aio.ServicerContext, state: CallState, rpc: str
) -> None:
    """A call grpc cancelled because its deadline passed is audited as failed with
    DEADLINE_EXCEEDED: it was allowed, its work was stopped, its client got that status.
    A client that cancels is not. Judged once per call, by the servicer's block (it
    names the resource); the edge's own deadlines are audited as errors of their own."""
    scope = state.scope
    if state.call is None or scope is None or scope.end_judged:
        return
    scope.end_judged = True
    left = context.time_remaining()
    if left is None or left > _EXPIRY_TOLERANCE_SECONDS:
        return
    await _jobs_ended(scope)
    try:
        await audit_job(
            _audit_failure, guard, state.call, state.resource or rpc, "DEADLINE_EXCEEDED",
            EXPIRED,
        )  # fmt: skip
    except Exception:  # the client is gone; the log keeps what the trail could not
        log.exception("could not audit an expired call", extra={"rpc": rpc})


async def _jobs_ended(scope: CallScope) -> None:
    """Wait, at most ``_JOBS_WAIT_SECONDS``, for the call's worker jobs to end (its
    deadline is stopped, so they stop at their next step): what they commit on the way
    out precedes the expiry's event in the trail. SignRecord holds its read event until
    its signature commits, and commits it alone when the signing stops; audited at once,
    the expiry could come before that read event (seen 2 times in 150 calls)."""
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def end() -> None:
        if not ended.done():
            ended.set_result(None)

    scope.after_jobs(end)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_JOBS_WAIT_SECONDS):
            await asyncio.shield(ended)


def entered(state: CallState) -> Call:
    """The call the edge entered; handlers run only after it did."""
    if state.call is None:
        raise RuntimeError("the call was not entered at the edge (service.edge)")
    return state.call
