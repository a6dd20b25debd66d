"""Fair shares of the server: concurrent calls per principal and per application.

grpc's ``maximum_concurrent_rpcs`` is one global counter: whoever fills it locks every
other caller out. Here each principal (a certificate CN or a delegated user) may hold at
most its share of concurrent calls, and an application at most its share over all the
users it relays for; only the caller over its share is refused (RESOURCE_EXHAUSTED).

Refusals are audited, but not one event each: a caller hammering the server would
otherwise write the trail as fast as it can send. The first refusal of a principal opens
a window; when the window closes, one event records how many calls were refused in it.

Everything here runs on the event loop (one thread), so the counters need no lock.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from service.authn import Principal
from service.errors import ServiceError

log = logging.getLogger(__name__)


class TooManyCallsError(ServiceError):
    """The caller holds its whole share of concurrent calls (RESOURCE_EXHAUSTED)."""


class UploadsBusyError(ServiceError):
    """Every upload slot of the server is taken (RESOURCE_EXHAUSTED; server.max_uploads)."""


class UploadGate:
    """Counts uploads streaming at once over all callers; refuses beyond ``cap``.

    An upload holds a store thread for as long as its client keeps sending (up to
    ``idle_seconds`` per message), so without this a few principals, each within its
    share, could hold every thread of the pool and starve reads. Refused at once rather
    than queued: a queued upload would hold its call slot without progress. Runs on the
    event loop (one thread): no lock.
    """

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._open = 0

    def acquire(self) -> Callable[[], None]:
        """Take one upload slot; its release (call it once, on the loop).
        ``UploadsBusyError`` if none is free."""
        if self._open >= self._cap:
            raise UploadsBusyError(
                f"the server is receiving {self._cap} uploads already (server.max_uploads); "
                "retry shortly"
            )
        self._open += 1

        def release() -> None:
            self._open -= 1

        return release

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one upload slot for the block; ``UploadsBusyError`` if none is free."""
        release = self.acquire()
        try:
            yield
        finally:
            release()


class PdfBusyError(ServiceError):
    """Every slot for holding a whole PDF in memory is taken (RESOURCE_EXHAUSTED)."""


class PdfSlots:
    """Counts PDFs held whole in memory at once (PAdES signing, verifying a PDF that may
    embed signatures); refuses beyond ``cap``.

    pyHanko needs the whole file (up to 64 MiB) and more for its copy and parse: without
    a bound across callers, a few principals each within their share of calls could
    hold gigabytes. Refused at once, as uploads are, rather than queued on a store
    thread. Taken from the store's worker threads: a lock guards the count.
    """

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._held = 0
        self._lock = threading.Lock()

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot; ``PdfBusyError`` if none is free."""
        with self._lock:
            if self._held >= self._cap:
                raise PdfBusyError(
                    f"the server holds {self._cap} PDFs for signing or verifying already; "
                    "retry shortly"
                )
            self._held += 1
        try:
            yield
        finally:
            with self._lock:
                self._held -= 1


class StreamDeadlineError(ServiceError):
    """A request stream stayed silent past its deadline (DEADLINE_EXCEEDED; service.edge)."""


@dataclass(frozen=True, slots=True)
class Refusals:
    """What one closed window says: who, which share, how many calls were refused."""

    principal: Principal
    scope: str  # "principal" or "application"
    name: str
    share: int
    count: int
    seconds: float

    @property
    def resource(self) -> str:
        """The audit resource: ``principal/<name>`` or ``application/<name>``."""
        return f"{self.scope}/{self.name}"

    @property
    def reason(self) -> str:
        """The audit reason, with the count (no call details, so no patient data)."""
        return (
            f"{self.count} calls refused within {self.seconds:g} s: over the share of "
            f"{self.share} concurrent calls per {self.scope}"
        )


@dataclass
class _Window:
    principal: Principal
    share: int
    count: int = 0


class CallLimiter:
    """Counts each principal's (and application's) calls in flight; refuses beyond a share."""

    def __init__(
        self,
        principal_share: int,
        application_share: int,
        summary_seconds: float,
        report: Callable[[Refusals], None],
    ) -> None:
        self._shares = {"principal": principal_share, "application": application_share}
        self._seconds = summary_seconds
        self._report = report  # blocking (writes the audit event): run in a thread
        self._active: dict[tuple[str, str], int] = {}
        self._windows: dict[tuple[str, str], _Window] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def active(self, scope: str, name: str) -> int:
        """Calls in flight for ``scope``/``name`` (for tests and metrics)."""
        return self._active.get((scope, name), 0)

    @staticmethod
    def _keys(principal: Principal) -> list[tuple[str, str]]:
        keys = [("principal", principal.name)]
        if principal.application:
            keys.append(("application", principal.application))
        return keys

    def acquire(self, principal: Principal) -> Callable[[], None]:
        """Take one call slot of ``principal`` (and its application); returns its release."""
        keys = self._keys(principal)
        for key in keys:
            share = self._shares[key[0]]
            if self._active.get(key, 0) >= share:
                self._refused(key, principal, share)
                raise TooManyCallsError(
                    f"too many concurrent calls: this {key[0]} holds its share of {share}; "
                    "retry when one of its calls has finished"
                )
        for key in keys:
            self._active[key] = self._active.get(key, 0) + 1
        return functools.partial(self._release, keys)

    def _release(self, keys: list[tuple[str, str]]) -> None:
        for key in keys:
            left = self._active[key] - 1
            if left:
                self._active[key] = left
            else:
                del self._active[key]

    @contextmanager
    def slot(self, principal: Principal) -> Iterator[None]:
        """Hold one call slot of ``principal`` (and its application) for the block."""
        release = self.acquire(principal)
        try:
            yield
        finally:
            release()

    def _refused(self, key: tuple[str, str], principal: Principal, share: int) -> None:
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window(principal, share)
            asyncio.get_running_loop().call_later(self._seconds, self._close, key, window)
        window.count += 1

    def _summary(self, key: tuple[str, str], window: _Window) -> Refusals:
        return Refusals(window.principal, key[0], key[1], window.share, window.count, self._seconds)

    def _close(self, key: tuple[str, str], window: _Window) -> None:
        if self._windows.get(key) is not window:
            return  # flushed already
        del self._windows[key]
        task = asyncio.get_running_loop().create_task(self._write(self._summary(key, window)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, refusals: Refusals) -> None:
        try:
            await asyncio.to_thread(self._report, refusals)
        except Exception:  # the refused callers got their status; the log keeps this
            log.exception("could not audit refused calls", extra={"scope": refusals.scope})

    async def flush(self) -> None:
        """Write the windows still open and wait for pending writes (at shutdown)."""
        for key, window in list(self._windows.items()):
            self._close(key, window)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
