"""An expired call's work is stopped at once, and its DEADLINE_EXCEEDED event follows
what its worker jobs commit on the way out (``service.calls.handled``): SignRecord holds
its read event until the signature commits and commits it alone when the signing stops,
so auditing the expiry at once could put the failure before the read in the trail; and
its signature, queued for a busy audit writer, must find the call's deadline stopped.

In process: the real ``handled`` and ``CallScope``, a recording stand-in for the guard
(the audit trail's own tests cover the writing) and for grpc's servicer context.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from service import calls
from service.call_scope import CallScope
from storage.deadlines import CallDeadline


class _Guard:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.failed = threading.Event()

    def audit_failure(self, call: object, resource: str, status: str, reason: str = "") -> None:
        self.events.append(f"failed {status}")
        self.failed.set()


class _Context:
    def time_remaining(self) -> float:
        return 0.0  # the deadline is reached: the cancellation is the expiry


def _expired_call_with_a_running_job(guard: _Guard, hold: float) -> list[str]:
    """The trail's order when the job is released once the expiry was audited, or after
    ``hold`` seconds."""

    async def scenario() -> list[str]:
        scope = CallScope(CallDeadline.within(30))
        state_seen = asyncio.Event()
        release = threading.Event()

        def job() -> None:  # a worker that commits its held read event as it stops
            release.wait(10)
            # By then the call's work is stopped: a change still queued for the audit
            # writer checks this and stores nothing (SignRecord's signature row).
            guard.events.append("allowed read" if scope.deadline.stopped else "deadline running")
            scope.job_ended()

        worker = threading.Thread(target=job, daemon=True)

        async def handler() -> None:
            token = calls.CALL_SCOPE.set(scope)
            try:
                async with calls.handled(guard, _Context(), "SignRecord") as state:  # type: ignore[arg-type]
                    state.call = object()  # type: ignore[assignment]
                    state.resource = "record/r/v1"
                    scope.job_started()
                    worker.start()
                    state_seen.set()
                    await asyncio.sleep(60)
            finally:
                calls.CALL_SCOPE.reset(token)

        task = asyncio.create_task(handler())
        await state_seen.wait()
        task.cancel()
        # The job ends once the expiry was audited (without the wait) or after ``hold``.
        await asyncio.to_thread(guard.failed.wait, hold)
        release.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # When the expiry did not wait for it, the job may still be on its way out:
        # the order is read once it has recorded its step.
        await asyncio.to_thread(worker.join, 10)
        return guard.events

    return asyncio.run(scenario())


def test_the_expiry_is_audited_after_the_calls_jobs_have_ended() -> None:
    guard = _Guard()
    # Held 1 s, within the expiry's 5 s wait for it: the expiry follows the job's step.
    assert _expired_call_with_a_running_job(guard, 1.0) == [
        "allowed read", "failed DEADLINE_EXCEEDED",
    ]  # fmt: skip


def test_a_job_that_does_not_end_delays_the_expiry_only_so_long(monkeypatch: Any) -> None:
    monkeypatch.setattr(calls, "_JOBS_WAIT_SECONDS", 0.2)
    guard = _Guard()
    # The job is released only once the failure was recorded: with the bound at 0.2 s the
    # expiry is audited first, without waiting for it. (Released after 1 s instead, as
    # before, the job's step came first whenever a loaded machine took that long to
    # audit the expiry.) 10 s only bounds a broken expiry that never audits.
    assert _expired_call_with_a_running_job(guard, 10.0) == [
        "failed DEADLINE_EXCEEDED", "allowed read",
    ]  # fmt: skip
