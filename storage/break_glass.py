"""The break-the-glass review queue, built from the audit trail, checked against grant rows.

A break-the-glass grant and its ``allowed`` audit event on ``grant/<id>`` commit in one
transaction (``service.access_servicer``), so the trail, hash-chained and checkpointed,
is the authority on which emergency accesses happened; the grant row only carries the
sealed reason and the review. A database writer who deletes a row, or sets its
``break_glass`` to false (its MAC then fails), must not make the access vanish from the
officer's queue: every recent break-the-glass event whose row is missing, fails its MAC
or is no longer break-the-glass appears in the queue flagged ``TAMPERED_MARK`` and is
reported (``SqlGrantStore.report_forged``, a ``grant-tampered`` incident).

Bounded: the queue joins the first events of the ``QUEUE_EVENT_SCAN`` grants with the
most recent break-the-glass events (one query on ``audit_events.action``, grouped by
resource, so that repeating one grant's event cannot push another's out); authentic
rows are listed whatever their age, as before. An event older than that window whose
row is later deleted is not flagged by the queue, but ``medvault audit verify`` still
holds the event.

Each item carries the role and application of its event (the row holds neither), so the
officer sees in which capacity the glass was broken; for rows older than the window
their events are looked up by grant.

A review written into the database (it does not open) is replaced by the officer's
real one in the same transaction, if the row is still as the officer's request saw it:
otherwise it would block the review, which applies only to an unreviewed row.

Closing a flagged item restores the row from its event (principal, patient index,
time), expired at once (at the event's time, or now if the event claims a later one)
so it grants nothing, with ``RESTORED_MARK`` as its sealed
reason, and then reviews it: the review and its comment are kept like any other.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from storage.audit_model import ChainedEvent
from storage.audit_rows import UNREADABLE, to_event
from storage.audit_sql import SELECT_EVENTS, audit_events, rows_as_read, time_parser
from storage.errors import RecordConflictError, RecordNotFoundError
from storage.grant_rows import access_grants, check_grant_id, is_grant_id
from storage.grants import SqlGrantStore
from storage.grants_model import Grant
from storage.sql_metadata import run_in_transaction, translated_change

logger = logging.getLogger(__name__)
QUEUE_EVENT_SCAN = 10_000  # most recent break-the-glass grants (by event) compared with rows
TAMPERED_MARK = "[grant row missing or altered]"
RESTORED_MARK = "[grant row missing or altered; restored from the audit trail on review]"
_PREFIX = "grant/"
# A resource naming a grant (storage.grant_rows.is_grant_id: 32 lowercase hex digits).
_GLOB = _PREFIX + "[0-9a-f]" * 32
_REGEX = "^" + _PREFIX + "[0-9a-f]{32}$"
_NO_PATIENT = bytes(32)  # a restored row needs an index; an event always has one
_BATCH = 500  # grant ids per IN (...) lookup of older events


@dataclass(frozen=True, slots=True)
class BreakGlassEvent:
    """What the trail says about one break-the-glass access."""

    grant_id: str
    principal: str
    patient_index: bytes
    time: datetime
    application: str = ""
    role: str = ""


@dataclass(frozen=True, slots=True)
class QueueItem:
    """One entry of the review queue: the grant, and who broke the glass as the trail says.

    ``application`` and ``role`` come from the break-the-glass event (the grant row does
    not hold them); empty when no event names the grant.
    """

    grant: Grant
    application: str
    role: str


@dataclass(frozen=True, slots=True)
class ReviewTarget:
    """The grant a review is about: its row if authentic, else its event (``flagged``)."""

    grant: Grant
    flagged: bool
    seen: tuple[Any, ...] | None  # the raw row when read (None: no row), to detect a change

    @property
    def forged_review(self) -> bool:
        """The row carries a review that does not authenticate (written in the database)."""
        if self.flagged or self.seen is None or self.grant.reviewed_at is not None:
            return False
        return (
            dict(zip(access_grants.columns.keys(), self.seen, strict=True))["reviewed_at"]
            is not None
        )


class BreakGlassReview:
    """The review queue and reviews, over the grant store and the trail's events."""

    def __init__(self, grants: SqlGrantStore, action: str, scan: int = QUEUE_EVENT_SCAN) -> None:
        self._grants = grants
        self._parse_time = time_parser(grants.engine.dialect)
        self._action = action  # the trail's action name of break-the-glass (the service's)
        self._scan = scan

    def queue(self, include_reviewed: bool) -> list[QueueItem]:
        """Unreviewed grants oldest first (flagged ones included); then reviewed ones if asked."""
        # Events first: an event seen implies its row was committed (same transaction),
        # so reading rows afterwards cannot flag a grant created in between.
        events = self._run(self._recent)
        opened = self._grants.break_glass_rows(include_reviewed=True)
        by_id = {e.grant_id: e for e in events}
        legacy = [g.id for g, is_legacy in opened if is_legacy]
        if missing := [i for i in legacy if i not in by_id]:
            by_id.update(self._run(lambda c: self._events_of(c, missing)))
        rows = [self._as_the_trail_says(g, by_id.get(g.id)) if is_legacy else g
                for g, is_legacy in opened]  # fmt: skip
        present = {g.id for g in rows}
        flagged = [self._flag(e) for e in events if e.grant_id not in present]
        grants = sorted([*rows, *flagged], key=lambda g: (g.created_at, g.id))
        pending = [g for g in grants if g.reviewed_at is None]
        reviewed = [g for g in grants if g.reviewed_at is not None]
        shown = pending + (reviewed if include_reviewed else [])
        older = [g.id for g in shown if g.id not in by_id]  # authentic rows past the window
        if older:
            by_id.update(self._run(lambda c: self._events_of(c, older)))
        return [_item(g, by_id.get(g.id)) for g in shown]

    def _as_the_trail_says(self, grant: Grant, event: BreakGlassEvent | None) -> Grant:
        """A legacy grant (principal and patient unauthenticated) as the queue lists it:
        flagged from its event where they differ; unreviewed without an event, or where
        its reviewer is the principal the event names (cold review 9e)."""
        if event is None:
            self._grants.report_forged(grant.id)
            return dataclasses.replace(grant, reviewed_at=None, reviewed_by=None)
        if (event.principal, event.patient_index) != (grant.principal, grant.patient_index):
            return self._flag(event)
        if grant.reviewed_by == event.principal:
            self._grants.report_forged(grant.id)
            return dataclasses.replace(grant, reviewed_at=None, reviewed_by=None)
        return grant

    def target(self, grant_id: str) -> ReviewTarget:
        """What a review of ``grant_id`` is about; ``RecordNotFoundError`` if nothing."""
        check_grant_id(grant_id)
        grant, seen = self._grants.review_state(grant_id)
        if grant is not None and _legacy_row(seen):
            # A legacy row's principal and patient are not authenticated (no MAC): whoever
            # broke the glass could name someone else there and review their own access
            # (cold review 9d). The trail's event decides; without one (deleted for the
            # moment of a review, cold review 9e) there is nothing to review against.
            event = self._run(lambda c: self._event(c, grant_id))
            if event is None:
                self._grants.report_forged(grant_id)
                raise RecordConflictError(
                    "this legacy grant has no break-the-glass event in the audit trail; "
                    "run `medvault audit verify` before reviewing it"
                )
            if (event.principal, event.patient_index) != (grant.principal, grant.patient_index):
                return ReviewTarget(self._flag(event), flagged=True, seen=seen)
        if grant is not None:
            return ReviewTarget(grant, flagged=False, seen=seen)
        event = self._run(lambda c: self._event(c, grant_id))
        if event is None:
            if seen is None:
                raise RecordNotFoundError("no such grant")
            # A care-team grant (or a forged row with no event): the store refuses it.
            return ReviewTarget(self._grants.get(grant_id), flagged=False, seen=seen)
        return ReviewTarget(self._flag(event), flagged=True, seen=seen)

    def review_change(
        self, target: ReviewTarget, reviewer: str, comment: str, now: datetime
    ) -> Callable[[Connection], Grant]:
        """Mark ``target`` reviewed (restoring a flagged row first), as a connection change."""
        review = self._grants.review_change(target.grant.id, reviewer, comment, now)
        if target.forged_review:
            # Not a review (it does not open), but it would block the real one, which
            # only applies to an unreviewed row: clear it first, if the row is as seen.
            return translated_change(_after(self._clear_review(target), review))
        if not target.flagged:
            return review
        # Expired at once, whatever time the event claims: a database writer can insert
        # an event dated years ahead, and the token MACs this row, so an expiry taken
        # from the event alone would turn the officer's close into a live grant.
        expired = min(target.grant.created_at, now)
        restored = dataclasses.replace(target.grant, expires_at=expired, reason=RESTORED_MARK)
        insert = self._grants.insert_change(restored)  # sealed and MACed now, in the token
        grant_id = target.grant.id

        def restore(connection: Connection) -> Grant:
            # Audit changes run one at a time (the trail's head lock): if the row is not
            # what the target saw, another officer closed it meanwhile.
            select = sa.select(access_grants).where(access_grants.c.id == grant_id)
            row = connection.execute(select).first()
            if (None if row is None else tuple(row)) != target.seen:
                raise RecordConflictError("the grant changed meanwhile; list the queue again")
            connection.execute(access_grants.delete().where(access_grants.c.id == grant_id))
            insert(connection)
            return review(connection)

        return translated_change(restore)

    @staticmethod
    def _clear_review(target: ReviewTarget) -> Callable[[Connection], None]:
        grant_id = target.grant.id

        def clear(connection: Connection) -> None:
            select = sa.select(access_grants).where(access_grants.c.id == grant_id)
            row = connection.execute(select).first()
            if (None if row is None else tuple(row)) != target.seen:
                raise RecordConflictError("the grant changed meanwhile; list the queue again")
            connection.execute(
                access_grants.update()
                .where(access_grants.c.id == grant_id)
                .values(reviewed_at=None, reviewed_by=None, sealed_comment=None)
            )

        return clear

    def _flag(self, event: BreakGlassEvent) -> Grant:
        self._grants.report_forged(event.grant_id)
        return Grant(
            id=event.grant_id, patient_index=event.patient_index, principal=event.principal,
            granted_by=event.principal, created_at=event.time, expires_at=None,
            revoked_at=None, revoked_by=None, break_glass=True, reason=TAMPERED_MARK,
            reviewed_at=None, reviewed_by=None, review_comment=None,
        )  # fmt: skip

    def _select(self, connection: Connection) -> sa.Select[Any]:
        """Every column, read as the audit log reads its rows (``_events``)."""
        return SELECT_EVENTS.where(*self._break_glass(connection))

    def _break_glass(self, connection: Connection) -> list[sa.ColumnElement[bool]]:
        """Break-the-glass events at chain positions: a row at 0 or below, or (SQLite) a
        sequence of another type, is in no chain and must not stand first for a grant."""
        e = audit_events.c
        where = [e.action == self._action, e.outcome == "allowed", e.sequence > 0]
        # Exactly ``grant/`` and a grant id (case-sensitive: SQLite's LIKE is not), so a
        # row naming no grant cannot take a place in the window and then vanish.
        if connection.dialect.name == "sqlite":
            where += [sa.func.typeof(e.sequence) == "integer", e.resource.op("GLOB")(_GLOB)]
        else:
            where.append(e.resource.regexp_match(_REGEX))
        return where

    def _rows(self, connection: Connection, query: sa.Select[Any]) -> list[_Read]:
        """``query``'s rows read defensively (``storage.audit_rows``): a database writer's
        row of a type, text or time the writer never stores is a malformed placeholder
        (with the resource it names, when that is text), not an outage of the queue."""
        with rows_as_read(connection):
            rows = connection.execute(query).all()
        return [
            _Read(
                to_event(cast("Mapping[str, Any]", r._mapping), self._parse_time),
                r._mapping["resource"],
            )
            for r in rows
        ]

    def _events_of(self, connection: Connection, ids: list[str]) -> dict[str, BreakGlassEvent]:
        """The first break-the-glass event of each of ``ids`` (bounded batches)."""
        found: dict[str, BreakGlassEvent] = {}
        for start in range(0, len(ids), _BATCH):
            resources = [_PREFIX + i for i in ids[start : start + _BATCH]]
            query = self._select(connection).where(audit_events.c.resource.in_(resources))
            found.update((e.grant_id, e) for e in _events(self._rows(connection, query)))
        return found

    def _recent(self, connection: Connection) -> list[BreakGlassEvent]:
        # The window counts grants, not events: events repeating one grant's resource
        # (a database writer's flood) must not push another grant's event out of it.
        e = audit_events.c
        firsts = (
            sa.select(sa.func.min(e.sequence).label("first"))
            .where(*self._break_glass(connection))
            .group_by(e.resource)
            .order_by(sa.func.max(e.sequence).desc())
            .limit(self._scan)
            .subquery()
        )
        query = self._select(connection).join(firsts, e.sequence == firsts.c.first)
        read = self._rows(connection, query)
        events = {x.grant_id: x for x in _events(read)}
        # A grant whose first event is malformed (a database writer changed an earlier
        # row to name it) is looked up again among all its events: a forged row must not
        # hide the genuine one; with none well-formed it is still listed (_unreadable).
        suspects = sorted({g for r in read if (g := r.named_grant()) and g not in events})
        if suspects:
            events.update(self._events_of(connection, suspects))
            logger.warning(
                "break-the-glass events unreadable (changed in the database); run "
                "`medvault audit verify`", extra={"grants": len(suspects)},
            )  # fmt: skip
            events.update((g, _unreadable(g)) for g in suspects if g not in events)
        return list(events.values())

    def _event(self, connection: Connection, grant_id: str) -> BreakGlassEvent | None:
        query = self._select(connection).where(audit_events.c.resource == _PREFIX + grant_id)
        found = _events(self._rows(connection, query.order_by(audit_events.c.sequence)))
        return found[0] if found else None

    def _run(self, fn: Callable[[Connection], Any]) -> Any:
        return run_in_transaction(self._grants.engine, fn)


def _legacy_row(seen: tuple[Any, ...] | None) -> bool:
    """The raw row is a legacy one (``storage.grant_reads``: no MAC, a clear reason)."""
    if seen is None:
        return False
    row = dict(zip(access_grants.columns.keys(), seen, strict=True))
    return row["mac"] is None and bool(row["reason"])


@dataclass(frozen=True, slots=True)
class _Read:
    """A row as read: its event (a placeholder if malformed) and its raw resource."""

    event: ChainedEvent
    resource: object

    def named_grant(self) -> str | None:
        """The grant a malformed row names, if its resource is readable text."""
        if not self.event.malformed or type(self.resource) is not str:
            return None
        grant_id = self.resource[len(_PREFIX) :]
        return grant_id if self.resource.startswith(_PREFIX) and is_grant_id(grant_id) else None


def _events(rows: Sequence[_Read]) -> list[BreakGlassEvent]:
    """Well-formed events naming a well-formed grant id, oldest first (one per grant).

    Malformed rows are left out here: ``_recent`` looks their grants up again.
    """
    found: dict[str, BreakGlassEvent] = {}
    good = sorted((r.event for r in rows if not r.event.malformed), key=lambda e: e.sequence)
    for event in good:
        entry = event.entry
        grant_id = entry.resource[len(_PREFIX) :]
        if is_grant_id(grant_id) and grant_id not in found:
            index = entry.patient_index if entry.patient_index is not None else _NO_PATIENT
            found[grant_id] = BreakGlassEvent(
                grant_id, entry.principal, index, entry.time,
                application=entry.application, role=entry.role,
            )  # fmt: skip
    return list(found.values())


def _unreadable(grant_id: str) -> BreakGlassEvent:
    """A grant only malformed events name: listed (flagged if its row is gone), nothing
    of the rows shown; ``medvault audit verify`` names them."""
    return BreakGlassEvent(grant_id, "unknown", _NO_PATIENT, UNREADABLE.time)


def _after(
    first: Callable[[Connection], None], then: Callable[[Connection], Grant]
) -> Callable[[Connection], Grant]:
    def both(connection: Connection) -> Grant:
        first(connection)
        return then(connection)

    return both


def _item(grant: Grant, event: BreakGlassEvent | None) -> QueueItem:
    if event is None:
        return QueueItem(grant, "", "")
    return QueueItem(grant, event.application, event.role)
