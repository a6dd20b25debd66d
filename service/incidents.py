"""Incident detection (Circular 53, Article 4.5): bursts of denials, unusual read volume,
tampered records.

Sliding windows per source address (denied or failed authentications and denied
calls) and per principal (reads). Crossing a threshold raises one incident per window:
an ``incident`` event in the audit trail, a warning log line and a Prometheus counter.
Thresholds come from the policy's ``[incidents]`` table, so SIGHUP adjusts them.
A metadata row that fails verification (``storage.row_auth``) raises a ``row-tampered``
incident at once, one per record version and denial window.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol

from prometheus_client import Counter

from service.authz.model import IncidentConfig
from storage import AuditEntry

log = logging.getLogger(__name__)
_TAMPER_MEMORY = 10_000  # resources remembered for the quiet window
INCIDENTS = Counter(
    "medvault_incidents", "Security incidents detected", labelnames=("kind",)
)


def signal(kind: str, subject: str) -> None:
    """Count an incident and log it (no patient data: kind and subject only)."""
    INCIDENTS.labels(kind=kind).inc()
    log.warning("security incident", extra={"incident": kind, "subject": subject})


def incident_entry(kind: str, principal: str, source: str, description: str) -> AuditEntry:
    """The audit event of an incident."""
    return AuditEntry(
        time=datetime.now(UTC),
        principal=principal,
        action="incident",
        resource=f"incident/{kind}",
        outcome="failed",
        status=kind,
        reason=description,
        source=source,
    )


class _Window:
    """Event times of one key within a sliding window, and when it last alarmed."""

    def __init__(self) -> None:
        self.times: deque[float] = deque()
        self.alarmed_at = float("-inf")

    def add(self, now: float, window: float, threshold: int) -> bool:
        """Count an event; True when this one crosses the threshold (once per window)."""
        self.times.append(now)
        while self.times and self.times[0] <= now - window:
            self.times.popleft()
        if len(self.times) >= threshold and now - self.alarmed_at >= window:
            self.alarmed_at = now
            return True
        return False


class EventRecorder(Protocol):
    """Where incident events go: the audit trail (``service.audit.trail.AuditTrail``).

    A Protocol rather than the trail's class: the trail's checkpoints raise incidents
    too (``signal``, ``incident_entry``), so this module must not import the trail.
    """

    def record(self, entry: AuditEntry, /) -> object:
        """Commit ``entry`` to the trail."""
        ...


class IncidentDetector:
    """Counts denials per source and reads per principal; raises incidents."""

    def __init__(
        self,
        thresholds: Callable[[], IncidentConfig],
        trail: EventRecorder,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._thresholds = thresholds
        self._trail = trail
        self._clock = clock
        self._lock = threading.Lock()
        self._denied: defaultdict[str, _Window] = defaultdict(_Window)
        self._reads: defaultdict[str, _Window] = defaultdict(_Window)
        self._tampered: dict[str, float] = {}  # resource -> when it last alarmed
        self._required_lock = threading.Lock()

    def denied(self, source: str) -> None:
        """A denied call or failed authentication from ``source``."""
        limits = self._thresholds()
        with self._lock:
            alarm = self._denied[source].add(
                self._clock(), limits.denied_window_seconds, limits.denied_threshold
            )
        if alarm:
            self._raise("denied-burst", source, source,
                        f"{limits.denied_threshold} denied or failed calls within "
                        f"{limits.denied_window_seconds} s from one source")

    def read(self, principal: str) -> None:
        """A read of patient data by ``principal``."""
        limits = self._thresholds()
        with self._lock:
            alarm = self._reads[principal].add(
                self._clock(), limits.read_window_seconds, limits.read_threshold
            )
        if alarm:
            self._raise("read-volume", principal, "",
                        f"{limits.read_threshold} reads within {limits.read_window_seconds} s "
                        "by one principal")

    def tampered(
        self, kind: str, resource: str, description: str, *, required: bool = False
    ) -> None:
        """A row that failed its authentication: someone wrote to the database.

        ``resource`` names the row (``record/<id>/v<n>``, ``grant/<id>``). Raised at most
        once per resource and denial window: a forged row met on every read must not
        flood the trail, and one event already names it (concurrent callers included).
        If the trail refuses the event, the resource is forgotten, so the next caller
        raises it again.
        ``required``: the trail's error is raised (the caller fails closed) rather than
        logged. Memory is bounded: past ``_TAMPER_MEMORY`` resources the oldest go.
        """
        if required:
            # One at a time: a caller that must fail closed waits for a report in flight
            # to commit (then it is made) or be refused (then it makes it itself).
            with self._required_lock:
                self._tampered_once(kind, resource, description, required=True)
        else:
            self._tampered_once(kind, resource, description, required=False)

    def _tampered_once(self, kind: str, resource: str, description: str, *, required: bool) -> None:
        window = self._thresholds().denied_window_seconds
        now = self._clock()
        with self._lock:
            if now - self._tampered.get(resource, float("-inf")) < window:
                return
            # Marked now, so concurrent readers of one forged row report it once;
            # unmarked below if the trail refuses the event.
            self._tampered.pop(resource, None)  # re-inserted last: the oldest go first
            while len(self._tampered) >= _TAMPER_MEMORY:
                del self._tampered[next(iter(self._tampered))]
            self._tampered[resource] = now
        signal(kind, resource)
        entry = replace(incident_entry(kind, "unknown", "", description), resource=resource)
        committed = False
        try:
            if required:
                self._trail.record(entry)
                committed = True
            else:
                committed = self._record(kind, entry)
        finally:
            if not committed:
                self._forget(resource, now)

    def _forget(self, resource: str, marked: float) -> None:
        """Unmark ``resource`` (its event was not committed) unless marked again since."""
        with self._lock:
            if self._tampered.get(resource) == marked:
                del self._tampered[resource]

    def _raise(self, kind: str, subject: str, source: str, description: str) -> None:
        signal(kind, subject)
        principal = subject if kind == "read-volume" else "unknown"
        self._record(kind, incident_entry(kind, principal, source, description))

    def _record(self, kind: str, entry: AuditEntry) -> bool:
        """Commit ``entry``; False (logged) if the trail refused it."""
        try:
            self._trail.record(entry)
        except Exception as e:  # noqa: BLE001  (the log line and the metric still report it)
            # The type only: a database error's text (a trigger's message) may carry
            # values; the trail logs its own failure (service.audit.trail._fail).
            log.error(  # noqa: TRY400  (not the traceback: see above)
                "could not audit an incident", extra={"incident": kind, "error": type(e).__name__}
            )
            return False
        return True
