"""An officer's listing and the ``audit-tampered`` incident (``service.audit.listing``),
with the real ``IncidentDetector`` over an in-memory trail: what a database writer's
malformed rows make the service write, at most.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pytest

from service.audit import AuditUnavailableError
from service.audit.listing import LOGGED_ROWS, readable
from service.authz.model import IncidentConfig
from service.incidents import _TAMPER_MEMORY, IncidentDetector
from storage import GENESIS_HASH, AuditEntry, ChainedEvent
from storage.audit_rows import UNREADABLE
from tests.unit.fakes import RecordedEvents

LIMITS = IncidentConfig(denied_window_seconds=60)


def _placeholders(count: int, start: int = 1) -> list[ChainedEvent]:
    """What ``SqlAuditLog.query`` yields for ``count`` rows with a forged outcome."""
    return [
        ChainedEvent(n, UNREADABLE, b"", b"", malformed=("outcome",))
        for n in range(start, start + count)
    ]


def _good(sequence: int) -> ChainedEvent:
    return ChainedEvent(sequence, UNREADABLE, GENESIS_HASH, GENESIS_HASH)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_incident_per_listing_naming_the_first_row_and_none_again_in_the_window() -> None:
    trail, clock = RecordedEvents(), _Clock()
    detector = IncidentDetector(lambda: LIMITS, trail, clock=clock)
    rows = [_good(1), *_placeholders(_TAMPER_MEMORY + 1, start=2), _good(10_100)]

    shown = [e.sequence for e in readable(rows, detector)]
    again = [e.sequence for e in readable(rows, detector)]

    assert shown == again == [1, 10_100]  # the rest of the listing is still shown
    assert [(e.action, e.resource, e.status) for e in trail.entries] == [
        ("incident", "audit/2", "audit-tampered")
    ]
    assert "sequence 2" in trail.entries[0].reason
    clock.now = 61.0  # past the window: listed again, reported again
    list(readable(rows, detector))
    assert len(trail.entries) == 2


def test_a_listing_that_meets_its_own_forged_report_ends() -> None:
    """A database writer's trigger forges every new incident row: the incident is
    appended to the trail an ascending listing reads, and comes back malformed."""
    trail = RecordedEvents()
    detector = IncidentDetector(lambda: LIMITS, trail, clock=lambda: 0.0)

    def chain() -> list[ChainedEvent]:
        return [*_placeholders(3), *_placeholders(len(trail.entries), start=100)]

    def listing():  # type: ignore[no-untyped-def]  # pages re-read the growing chain
        seen = 0
        while seen < len(page := chain()):
            yield from page[seen:]
            seen = len(page)

    assert list(readable(listing(), detector)) == []
    assert len(trail.entries) == 1


class _Refusing(RecordedEvents):
    """The trail refuses the first event (an outage, a trigger), then works."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = 0

    def record(self, entry: AuditEntry, /) -> object:
        if not self.refused:
            self.refused += 1
            raise AuditUnavailableError("the audit trail did not commit in time")
        return super().record(entry)


def test_a_listing_whose_report_cannot_commit_fails_and_the_next_one_reports() -> None:
    trail = _Refusing()
    detector = IncidentDetector(lambda: LIMITS, trail, clock=lambda: 0.0)
    rows = [_good(1), *_placeholders(1, start=2), _good(3)]

    listing = readable(rows, detector)
    assert next(listing).sequence == 1
    with pytest.raises(AuditUnavailableError):
        next(listing)  # nothing after the left-out row is shown
    assert [e.sequence for e in readable(rows, detector)] == [1, 3]
    assert [e.resource for e in trail.entries] == ["audit/2"]


def test_log_lines_are_bounded_and_name_no_value(caplog: pytest.LogCaptureFixture) -> None:
    detector = IncidentDetector(lambda: LIMITS, RecordedEvents(), clock=lambda: 0.0)
    caplog.set_level(logging.WARNING, logger="service.audit.listing")

    list(readable(_placeholders(LOGGED_ROWS + 15), detector))

    lines = [r for r in caplog.records if r.name == "service.audit.listing"]
    assert len(lines) == LOGGED_ROWS + 1
    assert [getattr(r, "sequence", None) for r in lines[:LOGGED_ROWS]] == list(
        range(1, LOGGED_ROWS + 1)
    )
    assert getattr(lines[-1], "rows", None) == LOGGED_ROWS + 15


def test_the_tamper_memory_forgets_the_oldest_resource_first() -> None:
    trail = RecordedEvents()
    detector = IncidentDetector(lambda: LIMITS, trail, clock=lambda: 0.0)
    for n in range(_TAMPER_MEMORY + 1):
        detector.tampered("row-tampered", f"record/{n}/v1", "test")
    assert len(trail.entries) == _TAMPER_MEMORY + 1

    detector.tampered("row-tampered", "record/5/v1", "test")  # remembered: nothing
    detector.tampered("row-tampered", "record/0/v1", "test")  # the oldest, forgotten
    assert [e.resource for e in trail.entries[_TAMPER_MEMORY + 1 :]] == ["record/0/v1"]


def test_a_refused_incident_is_raised_again_next_time() -> None:
    trail = _Refusing()
    detector = IncidentDetector(lambda: LIMITS, trail, clock=lambda: 0.0)
    detector.tampered("row-tampered", "record/r/v1", "test")  # refused: logged only
    detector.tampered("row-tampered", "record/r/v1", "test")
    assert [e.resource for e in trail.entries] == ["record/r/v1"]


class _Gated(RecordedEvents):
    """The first event waits until released, then commits or is refused (a trigger, an
    outage); later ones commit at once."""

    def __init__(self, *, refuse_first: bool) -> None:
        super().__init__()
        self.refuse_first = refuse_first
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self._lock = threading.Lock()

    def record(self, entry: AuditEntry, /) -> object:
        with self._lock:
            self.calls += 1
            first = self.calls == 1
        if first:
            self.entered.set()
            assert self.release.wait(10)
            if self.refuse_first:
                raise AuditUnavailableError("audit trail unavailable; retry later")
        return super().record(entry)


def _run(target: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as e:  # noqa: BLE001  (collected for the assertion)
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def test_concurrent_readers_of_one_forged_row_report_it_once() -> None:
    trail = _Gated(refuse_first=False)
    detector = IncidentDetector(lambda: LIMITS, trail, clock=lambda: 0.0)
    first, _ = _run(lambda: detector.tampered("row-tampered", "record/r/v1", "t"))
    assert trail.entered.wait(10)  # its event is being committed
    others = [_run(lambda: detector.tampered("row-tampered", "record/r/v1", "t")) for _ in range(7)]
    for thread, _ in others:
        thread.join(10)  # they do not wait for it: the row is being reported
        assert not thread.is_alive()
    trail.release.set()
    first.join(10)
    assert [e.resource for e in trail.entries] == ["record/r/v1"]


def test_a_listing_beside_one_whose_report_is_refused_reports_or_stops() -> None:
    """Listing A's report is in flight when listing B meets the same first row, then A's
    is refused: B must not show the listing without the row and with no record of it
    (review 2 of this feature). B waits for A's report, then makes its own."""
    trail = _Gated(refuse_first=True)
    detector = IncidentDetector(lambda: LIMITS, trail, clock=lambda: 0.0)
    rows = [_good(1), *_placeholders(1, start=2), _good(3)]
    shown_b: list[int] = []

    a, a_errors = _run(lambda: list(readable(rows, detector)))
    assert trail.entered.wait(10)
    b, b_errors = _run(lambda: shown_b.extend(e.sequence for e in readable(rows, detector)))
    trail.release.set()
    a.join(10)
    b.join(10)

    assert not a.is_alive()
    assert not b.is_alive()
    assert [type(e) for e in a_errors] == [AuditUnavailableError]
    assert "could not be reported" in str(a_errors[0])
    assert not b_errors
    assert shown_b == [1, 3]
    assert [e.resource for e in trail.entries] == ["audit/2"]
