"""A call's deadline, seen by every blocking step of the work done for it.

The service serves each call's work in worker threads; without this, a worker whose
client gave up (its deadline passed, or it cancelled) would go on reading S3, waiting
for the database or the token, and holding its thread, for as long as those take. The
service sets the call's ``CallDeadline`` in the call's context (``set_deadline``; a
block of its own: ``bounded``), which its worker threads run in; the S3
client (``storage.s3_blobs``), the SQL engine (``storage.sql_deadlines``) and the token
pool (through the hook ``time_left``) bound each request by the time left and start
nothing once it is gone; a stream checks between chunks.

Work that must run after the call is over (deleting a failed write's object, reading
whether its row committed) runs under ``grace``: a short deadline of its own. Work that
is not the call's (the audit writer, the sweeper, background tagging) runs in threads
that never see a deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import ParamSpec, TypeVar

from storage.errors import DeadlineExceededError

P = ParamSpec("P")
T = TypeVar("T")
# Cleanup after a failed or abandoned write gets this long, whatever the call had left:
# plenty for a delete on a working store; on a stalled one the sweeper removes the object.
GRACE_SECONDS = 1.0


class CallDeadline:
    """When a call's work must stop: at ``expires_at`` (``time.monotonic``), or once
    ``stop`` is called (the call ended); None: no deadline, only ``stop``."""

    def __init__(self, expires_at: float | None = None) -> None:
        self.expires_at = expires_at
        self._stopped = threading.Event()

    @classmethod
    def within(cls, seconds: float | None) -> CallDeadline:
        """A deadline ``seconds`` from now (None: none)."""
        return cls(None if seconds is None else time.monotonic() + seconds)

    def stop(self) -> None:
        """The call is over: work still running for it stops at its next step."""
        self._stopped.set()

    @property
    def stopped(self) -> bool:
        """Whether ``stop`` was called."""
        return self._stopped.is_set()

    def remaining(self) -> float | None:
        """Seconds left (0 once stopped or passed); None without a deadline."""
        if self._stopped.is_set():
            return 0.0
        if self.expires_at is None:
            return None
        return max(self.expires_at - time.monotonic(), 0.0)

    def check(self, step: str) -> None:
        """``DeadlineExceededError`` if no time is left for ``step``."""
        if self.remaining() == 0.0:
            raise DeadlineExceededError(
                f"the call's deadline passed (or its client went away) before {step}; "
                "nothing more was done for it"
            )


_CURRENT: ContextVar[CallDeadline | None] = ContextVar("medvault_deadline", default=None)


def time_left() -> float | None:
    """Seconds left for the current call's work (0: stop now); None: unbounded."""
    deadline = _CURRENT.get()
    return None if deadline is None else deadline.remaining()


def check_deadline(step: str) -> None:
    """``DeadlineExceededError`` if the current call has no time left for ``step``."""
    deadline = _CURRENT.get()
    if deadline is not None:
        deadline.check(step)


def checked_when_run(fn: Callable[P, T], step: str) -> Callable[P, T]:
    """``fn``, first checking the current call's deadline for ``step`` each time it runs,
    in whatever thread runs it: a change the audit writer runs for a call, after the
    call may have ended, in a thread that does not see the call's deadline."""
    deadline = _CURRENT.get()
    if deadline is None:
        return fn

    def checked(*args: P.args, **kwargs: P.kwargs) -> T:
        deadline.check(step)
        return fn(*args, **kwargs)

    return checked


@contextmanager
def bounded(deadline: CallDeadline | None) -> Iterator[None]:
    """Run the block under ``deadline`` (None: unbounded)."""
    token = _CURRENT.set(deadline)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def set_deadline(deadline: CallDeadline | None) -> None:
    """Set the deadline of the running task's context for good: an RPC's task, whose
    context ends with it (``bounded`` resets, which only works in the same context)."""
    _CURRENT.set(deadline)


def grace(seconds: float = GRACE_SECONDS) -> AbstractContextManager[None]:
    """Run the block under a short deadline of its own: cleanup after the call is over."""
    return bounded(CallDeadline.within(seconds))
