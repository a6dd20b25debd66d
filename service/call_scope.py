"""A call's scope: its deadline, and the worker jobs still running for it.

The edge (``service.edge``) opens one per call. Its ``CallDeadline`` (from the client's
deadline) reaches the store's worker threads through the context they run in
(``storage.deadlines``), so their S3, SQL and token steps stop once the call is over.
The store pool (``ContextExecutor``) and the stream threads (``service.streams``) count
each job under the call that submitted it; the edge gives the principal's call slot back
only once the call's last job has ended. A cancelled call's worker may still be finishing
a step: until it has, its thread is still the principal's, and its share says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

from prometheus_client import Gauge

from storage import CallDeadline

# Jobs of every call (and of none: health probes, refusal summaries) queued or running on
# the store's threads; a call that ended leaves none behind for long (docs/reliability.md).
# Under a supervisor (server.processes > 1) the sum over the live workers: a killed
# worker's last value leaves the sum (the default kept it, per pid, for ever).
WORKER_JOBS = Gauge(
    "medvault_worker_jobs", "Store jobs queued or running in worker threads",
    multiprocess_mode="livesum",
)  # fmt: skip


class CallScope:
    """One call's deadline and its count of jobs in worker threads."""

    def __init__(self, deadline: CallDeadline) -> None:
        self.deadline = deadline
        self.end_judged = False  # whether the call's end was judged for the audit yet
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._jobs = 0
        self._after: list[Callable[[], None]] = []

    def job_started(self) -> None:
        """A job was submitted for this call (on the event loop)."""
        with self._lock:
            self._jobs += 1

    def job_ended(self) -> None:
        """A job of this call ended, or was cancelled before it ran (any thread)."""
        with self._lock:
            self._jobs -= 1
            run = self._after if self._jobs == 0 else []
            if run:
                self._after = []
        for callback in run:
            # RuntimeError: the loop closed; the server is gone, and its counters with it.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(callback)

    def after_jobs(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop once no job of this call is left (now if none)."""
        with self._lock:
            if self._jobs:
                self._after.append(callback)
                return
        callback()


CALL_SCOPE: contextvars.ContextVar[CallScope | None] = contextvars.ContextVar(
    "medvault_call_scope", default=None
)


def track(future: futures.Future[Any]) -> futures.Future[Any]:
    """Count ``future``'s job under the current call (if any) and in ``WORKER_JOBS``."""
    scope = CALL_SCOPE.get()
    WORKER_JOBS.inc()
    if scope is not None:
        scope.job_started()

    def ended(_: futures.Future[Any]) -> None:
        WORKER_JOBS.dec()
        if scope is not None:
            scope.job_ended()

    future.add_done_callback(ended)
    return future


class ContextExecutor(futures.ThreadPoolExecutor):
    """A thread pool that runs each job in a copy of its submitter's context, and counts
    it under the submitter's call.

    ``loop.run_in_executor`` does not carry context variables into the pool (unlike
    ``asyncio.to_thread``): without this, a log line written by the store for a call
    would lose the call's id, and the store would not see the call's deadline.
    """

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        """Schedule ``fn`` in a copy of the current context."""
        return track(super().submit(contextvars.copy_context().run, fn, *args, **kwargs))
