"""Reading grants: a principal's access, listings, and the security officer's views
(break-the-glass queue, opened reasons and reviews), every row verified first.

A row whose MAC does not verify (``storage.grant_seal``), or that holds a value of a
type medvault never stores, grants nothing and is reported to ``on_forged``; so is an
authentic row that does not meet the query in Python (SQL decided on the bytes stored).
Sealed free text is opened only for the officer's views. ``SqlGrantStore``
(``storage.grants``) adds the writes.
"""

from __future__ import annotations

import builtins
import dataclasses
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, Row

from storage.errors import IntegrityError, InvalidRecordError, RecordNotFoundError
from storage.grant_revocations import RevocationCheck
from storage.grant_rows import (
    access_grants,
    check_actor,
    check_grant_id,
    check_patient,
    read_grant_row,
    row_to_grant,
)
from storage.grant_seal import GrantSealer
from storage.grants_model import Grant
from storage.sql_engine import run_in_transaction
from storage.sql_metadata import to_utc

LEGACY_MARK = "[legacy row, not verified]"
# Shown to the security officer instead of text that does not authenticate.
ALTERED_MARK = "[grant row altered in the database: not verified, grants nothing]"
REASON_UNREADABLE_MARK = "[sealed reason does not open: altered]"
REVIEW_ALTERED_MARK = "[review altered in the database: does not count]"

T = TypeVar("T")


def _with_review(grant: Grant, reviewed_at: datetime | None, by: str | None) -> Grant:
    return dataclasses.replace(grant, reviewed_at=reviewed_at, reviewed_by=by)


def _active_at(now: datetime | sa.BindParameter[datetime]) -> sa.ColumnElement[bool]:
    """The SQL form of ``Grant.active``: not revoked, and no expiry or expiring later."""
    return sa.and_(
        access_grants.c.revoked_at.is_(None),
        sa.or_(access_grants.c.expires_at.is_(None), access_grants.c.expires_at > now),
    )


# On every read's path: built once (a statement built per call costs SQLAlchemy a new
# cache key each time, bench/sign.py's GIL profile).
_HAS_ACCESS = (
    sa.select(access_grants)
    .where(
        access_grants.c.principal == sa.bindparam("principal"),
        access_grants.c.patient_index == sa.bindparam("patient_index"),
        _active_at(sa.bindparam("now", type_=access_grants.c.expires_at.type)),
    )
    .order_by(access_grants.c.break_glass, access_grants.c.created_at.desc())
)


class GrantReader:
    """Grants read from one SQL table; every statement is parameterised, every row verified."""

    def __init__(
        self,
        engine: Engine,
        sealer: GrantSealer,
        on_forged: Callable[[str], None] | None = None,
        revocations: RevocationCheck | None = None,
        on_unrevoked: Callable[[str], None] | None = None,
    ) -> None:
        self._engine = engine
        self._sealer = sealer
        self._on_forged = on_forged or (lambda _grant_id: None)
        # Markers outside the database (storage.grant_revocations): a grant one names is
        # revoked whatever its row says, and a row saying otherwise was rolled back.
        self._revocations = revocations
        self._on_unrevoked = on_unrevoked or self._on_forged

    @property
    def engine(self) -> Engine:
        """The database (the review queue reads the trail's events through it)."""
        return self._engine

    def report_forged(self, grant_id: str) -> None:
        """Report a grant row that is missing, altered or fails its MAC."""
        self._on_forged(grant_id)

    def get(self, grant_id: str) -> Grant:
        """The grant ``grant_id`` as stored (free text not opened); ``RecordNotFoundError``."""
        check_grant_id(grant_id)
        query = sa.select(access_grants).where(access_grants.c.id == grant_id)
        row = self._run(lambda c: c.execute(query).first())
        if row is None:
            raise RecordNotFoundError("no such grant")
        return row_to_grant(row)

    def has_access(self, principal: str, patient_index: bytes, now: datetime) -> Grant | None:
        """An active, authentic grant of ``principal`` on the patient, or ``None``.

        On the path of every read: one query on ``ix_access_grants_principal_patient``.
        A care-team grant is preferred to a break-the-glass one, so that a read the care
        team covers is not flagged as an emergency access. Rows failing their MAC are
        skipped (they grant nothing) and reported, and so are authentic rows that do not
        meet the query's conditions in Python (``Grant.answers``): SQL decided on the
        bytes stored, which a database writer can make differ from what the MAC covers.
        """
        now = to_utc(now, "now")
        params = {"principal": principal, "patient_index": patient_index, "now": now}
        rows = self._run(lambda c: c.execute(_HAS_ACCESS, params).all())
        return next(iter(self._answering(rows, patient_index, principal, now)), None)

    def list(
        self,
        patient_index: bytes | None,
        principal: str | None,
        include_inactive: bool,
        now: datetime,
    ) -> list[Grant]:
        """Authentic grants on a patient, of a principal, or both; newest first.

        At least one filter is required: an unfiltered listing would be a dump of who may
        see whom across the hospital.
        """
        query = _list_query(patient_index, principal, include_inactive, now)
        rows = self._run(lambda c: c.execute(query).all())
        return self._answering(rows, patient_index, principal, _active_at_of(include_inactive, now))

    def list_opened(
        self,
        patient_index: bytes | None,
        principal: str | None,
        include_inactive: bool,
        now: datetime,
    ) -> builtins.list[tuple[Grant, bool]]:
        """``list`` for a security officer: (grant, altered) pairs, free text opened.

        Authentic rows come with their reason and review opened (a review that does not
        authenticate is shown as ``REVIEW_ALTERED_MARK`` and does not count). Rows that
        fail their MAC are included as altered, as stored but with ``ALTERED_MARK`` for a
        reason and no review: the officer sees that something was edited, never text
        the service did not seal. Each is reported (an incident). Legacy rows (never
        adopted, see ``adopt_legacy``) grant nothing either: listed as altered, their
        clear text marked ``LEGACY_MARK``.
        """
        query = _list_query(patient_index, principal, include_inactive, now)
        active_at = _active_at_of(include_inactive, now)
        listed: builtins.list[tuple[Grant, bool]] = []
        for row in self._run(lambda c: c.execute(query).all()):
            if not row_to_grant(row).answers(patient_index, principal, None):
                self._on_forged(row._mapping["id"])  # another patient's or principal's row
            elif _legacy(row):  # its text, marked; it grants nothing until re-granted
                listed.append((self._opened(row), True))
            elif self._verified(row):
                opened = self._opened(row)
                marked = self._marked(opened)
                if marked.answers(None, None, active_at):
                    listed.append((marked, marked is not opened))  # rolled back: altered
                elif marked is opened:  # authentic but expired or revoked: SQL saw other bytes
                    self._on_forged(opened.id)
            else:
                grant = _with_review(row_to_grant(row), None, None)
                listed.append((dataclasses.replace(grant, reason=ALTERED_MARK), True))
        return listed

    # builtins.list: inside the class body ``list`` names the method above.
    def break_glass_queue(self, include_reviewed: bool) -> builtins.list[Grant]:
        """Break-the-glass grants awaiting review, oldest first; then reviewed ones if asked.

        Reasons and comments are opened here, for the security officer. A review that
        does not authenticate (set in the database, not by the service) does not count:
        the grant stays in the queue as unreviewed. Every break-the-glass row is read for
        that, since the database's ``reviewed_at`` alone is not trusted.
        """
        return [grant for grant, _legacy_row in self.break_glass_rows(include_reviewed)]

    def break_glass_rows(self, include_reviewed: bool) -> builtins.list[tuple[Grant, bool]]:
        """``break_glass_queue``, each grant with whether its row is a legacy one (no MAC:
        its principal and patient are not authenticated), decided on the row as stored,
        never on its text (a clinician may type anything as a reason)."""
        query = (
            sa.select(access_grants)
            .where(access_grants.c.break_glass == sa.true())
            .order_by(access_grants.c.created_at, access_grants.c.id)
        )
        rows = self._run(lambda c: c.execute(query).all())
        opened = [(self._opened(row), _legacy(row)) for row in rows
                  if self._verified(row) or _legacy(row)]  # fmt: skip
        # As the WHERE asked (see has_access).
        opened = [(g, legacy) for g, legacy in opened if g.break_glass]
        pending = [(g, legacy) for g, legacy in opened if g.reviewed_at is None]
        reviewed = [(g, legacy) for g, legacy in opened if g.reviewed_at is not None]
        return pending + (reviewed if include_reviewed else [])

    def review_state(self, grant_id: str) -> tuple[Grant | None, tuple[Any, ...] | None]:
        """The authentic (or legacy) break-the-glass grant ``grant_id`` opened, or None; and
        the raw row (None if there is none), so that a later change can be detected."""
        check_grant_id(grant_id)
        query = sa.select(access_grants).where(access_grants.c.id == grant_id)
        row = self._run(lambda c: c.execute(query).first())
        if row is None or row._mapping["id"] != grant_id:
            return None, None
        authentic = row._mapping["break_glass"] and (_legacy(row) or self._verified(row))
        return (self._opened(row) if authentic else None), tuple(row)

    def _verified(self, row: Row[Any]) -> bool:
        read = read_grant_row(row)
        if not read.forged and self._sealer.authentic(read.grant, read.sealed_reason, read.mac):
            return True
        self._on_forged(read.grant.id)
        return False

    def _answering(
        self,
        rows: Iterable[Row[Any]],
        patient_index: bytes | None,
        principal: str | None,
        active_at: datetime | None,
    ) -> builtins.list[Grant]:
        """The authentic grants of ``rows`` that meet the query's conditions in Python.

        An authentic row that does not was matched by SQL on bytes other than those its
        MAC covers (a view, another spelling of a time): tampering, reported as forged.
        """
        answering = []
        for row in rows:
            if not self._verified(row):
                continue
            grant = row_to_grant(row)
            marked = self._marked(grant)
            if marked.answers(patient_index, principal, active_at):
                answering.append(marked)
            elif marked is grant:
                self._on_forged(grant.id)
        return answering

    def _marked(self, grant: Grant) -> Grant:
        """``grant`` revoked as its revocation marker says, where its row says it is not:
        the row was put back to an earlier state (reported); else ``grant`` itself."""
        if self._revocations is None or grant.revoked_at is not None:
            return grant
        revoked_at = self._revocations.revoked_at(grant.id)
        if revoked_at is None:
            return grant
        self._on_unrevoked(grant.id)
        return dataclasses.replace(grant, revoked_at=revoked_at)

    def _opened(self, row: Row[Any]) -> Grant:
        """A verified row with its reason and (authentic) review opened."""
        read = read_grant_row(row)
        grant = read.grant
        legacy = _legacy(row)
        if legacy:  # not adopted (migrated without the token): clear text, unverified
            grant = dataclasses.replace(grant, reason=f"{LEGACY_MARK} {read.reason}")
        else:
            reason = self._open_reason(grant.id, read.sealed_reason)
            grant = dataclasses.replace(grant, reason=reason)
        if grant.reviewed_at is None or grant.reviewed_by is None:
            return _with_review(grant, None, None)
        if legacy and not read.sealed_comment:
            # Whether a row is legacy is decided by two columns nothing authenticates (no
            # MAC, a clear reason): a database writer who makes a genuine break-the-glass
            # row look legacy and fills in its review columns would otherwise take it off
            # the officer's queue (cold review 9c). Only a review the service sealed
            # counts; a legacy row's clear review is shown, unreviewed, for a new one.
            unreviewed = _with_review(grant, None, None)
            comment = read.review_comment or ""
            return dataclasses.replace(unreviewed, review_comment=f"{LEGACY_MARK} {comment}")
        try:
            comment = self._sealer.open_review(
                grant.id, grant.reviewed_by, grant.reviewed_at, read.sealed_comment or b""
            )
        except IntegrityError:
            # Set in the database, not by the service: not a review, and said so.
            self._on_forged(grant.id)
            unreviewed = _with_review(grant, None, None)
            return dataclasses.replace(unreviewed, review_comment=REVIEW_ALTERED_MARK)
        if grant.reviewed_by == grant.principal:
            # The service never seals a review by the grant's own principal (``review``
            # refuses it): such a row was relabelled around a review (cold review 9d).
            self._on_forged(grant.id)
            unreviewed = _with_review(grant, None, None)
            return dataclasses.replace(unreviewed, review_comment=REVIEW_ALTERED_MARK)
        return dataclasses.replace(grant, review_comment=comment)

    def _open_reason(self, grant_id: str, sealed: bytes | None) -> str | None:
        """The reason of a row whose MAC verified (which covers the seal's digest)."""
        if not sealed:
            return None
        try:
            return self._sealer.open_reason(grant_id, sealed)
        except IntegrityError:  # only with the MAC forged too: never show unopened text
            self._on_forged(grant_id)
            return REASON_UNREADABLE_MARK

    def _run(self, fn: Callable[[Connection], T], *, write: bool = False) -> T:
        return run_in_transaction(self._engine, fn, write=write)


def _list_query(
    patient_index: bytes | None, principal: str | None, include_inactive: bool, now: datetime
) -> sa.Select[Any]:
    """The checked query of ``SqlGrantStore.list``: newest first."""
    if patient_index is None and principal is None:
        raise InvalidRecordError("patient_index", "give a patient, a principal or both")
    query = sa.select(access_grants)
    if patient_index is not None:
        check_patient(patient_index)
        query = query.where(access_grants.c.patient_index == patient_index)
    if principal is not None:
        check_actor("principal", principal)
        query = query.where(access_grants.c.principal == principal)
    if not include_inactive:
        query = query.where(_active_at(to_utc(now, "now")))
    return query.order_by(access_grants.c.created_at.desc(), access_grants.c.id)


def _active_at_of(include_inactive: bool, now: datetime) -> datetime | None:
    """The time a listing's grants must be active at (None: any grant)."""
    return None if include_inactive else to_utc(now, "now")


def _legacy(row: Row[Any]) -> bool:
    """A row from before migration 0009 that was never adopted (no MAC, clear reason)."""
    return row._mapping["mac"] is None and bool(row._mapping["reason"])
