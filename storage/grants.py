"""Care-team grants, break-the-glass access and its review queue, on SQL (SQLAlchemy Core).

One table, ``access_grants`` (migrations ``0003``, ``0009``). The patient is its keyed
blind index; the store never sees a plaintext identifier. Rows are not trusted
(``storage.grant_seal``): each carries a MAC under a token-derived key, and a row whose
MAC does not verify grants nothing and is reported to ``on_forged``. The break-the-glass
reason and the review comment (free text that may name the patient) are stored only
sealed (``sealed_reason``, ``sealed_comment``); only the review queue and the
security officer's listing (``list_opened``) open them. The
clear ``reason`` column holds "" for sealed rows (its CHECK constraint predates sealing)
and text only in legacy rows that could not be adopted (see ``adopt_legacy``).

Times follow ``storage.sql_metadata``: stored in UTC, returned UTC-aware, naive input
refused. Every method takes ``now`` explicitly so that one request uses one clock
reading and tests need no sleeps.
"""

from __future__ import annotations

import builtins
import dataclasses
import re
import secrets
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, Row

from storage.errors import (
    IntegrityError,
    InvalidRecordError,
    RecordConflictError,
    RecordNotFoundError,
)
from storage.grant_seal import GrantSealer
from storage.grants_model import Grant
from storage.row_values import RowValues
from storage.sql_metadata import (
    metadata,
    run_in_transaction,
    to_utc,
    translated_change,
)
from storage.sqlite_text import StoredTime
from storage.validation import check_printable

MAX_PRINCIPAL_LENGTH = 128
MAX_TEXT_LENGTH = 1000  # reason and review comment
# The contract's ceiling for break-the-glass (access.proto); policy may ask for less.
MAX_BREAK_GLASS_DURATION = timedelta(hours=4)
PATIENT_INDEX_LENGTH = 32  # HMAC-SHA256
_GRANT_ID = re.compile(r"^[0-9a-f]{32}\Z")
# The Alembic attribute through which migration 0009 adopts legacy rows (see below).
GRANT_ADOPTER = "medvault.grant_adopter"
LEGACY_MARK = "[legacy row, not verified]"
# Shown to the security officer instead of text that does not authenticate.
ALTERED_MARK = "[grant row altered in the database: not verified, grants nothing]"
REASON_UNREADABLE_MARK = "[sealed reason does not open: altered]"
REVIEW_ALTERED_MARK = "[review altered in the database: does not count]"

T = TypeVar("T")

# The schema as queries see it; storage/migrations/versions/0003_grants.py made it.
# On the shared ``metadata`` so that Alembic compares one schema with the database.
access_grants = sa.Table(
    "access_grants",
    metadata,
    sa.Column("id", sa.String(32), nullable=False),
    sa.Column("patient_index", sa.LargeBinary(32), nullable=False),
    sa.Column("principal", sa.String(255), nullable=False),
    sa.Column("granted_by", sa.String(255), nullable=False),
    sa.Column("created_at", StoredTime(), nullable=False),
    sa.Column("expires_at", StoredTime(), nullable=True),
    sa.Column("revoked_at", StoredTime(), nullable=True),
    sa.Column("revoked_by", sa.String(255), nullable=True),
    sa.Column("break_glass", sa.Boolean, nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("reviewed_at", StoredTime(), nullable=True),
    sa.Column("reviewed_by", sa.String(255), nullable=True),
    sa.Column("review_comment", sa.Text, nullable=True),
    sa.Column("mac", sa.LargeBinary(32), nullable=True),
    sa.Column("sealed_reason", sa.LargeBinary, nullable=True),
    sa.Column("sealed_comment", sa.LargeBinary, nullable=True),
    sa.PrimaryKeyConstraint("id", name="pk_access_grants"),
    sa.CheckConstraint(
        "NOT break_glass OR (reason IS NOT NULL AND expires_at IS NOT NULL)",
        name="ck_access_grants_break_glass",
    ),
    sa.Index("ix_access_grants_principal_patient", "principal", "patient_index"),
    sa.Index("ix_access_grants_patient", "patient_index"),
    sa.Index("ix_access_grants_break_glass_reviewed", "break_glass", "reviewed_at"),
)


def _check_actor(field: str, value: str) -> None:
    """A person id or application CN: required, bounded, no control characters."""
    check_printable(field, value, MAX_PRINCIPAL_LENGTH, required=True)


def _check_text(field: str, value: str) -> None:
    """Free text (reason, comment): required and bounded.

    Control characters are refused as well: the text is shown in the security
    officer's terminal tables and exports, where they could forge lines or escapes.
    """
    check_printable(field, value, MAX_TEXT_LENGTH, required=True)


def _check_patient(patient_index: bytes) -> None:
    if len(patient_index) != PATIENT_INDEX_LENGTH:
        raise InvalidRecordError("patient_index", f"must be {PATIENT_INDEX_LENGTH} bytes")


def is_grant_id(value: str) -> bool:
    """Whether ``value`` has the form of a grant id."""
    return _GRANT_ID.match(value) is not None


def check_grant_id(grant_id: str) -> None:
    """``InvalidRecordError`` unless ``grant_id`` has the form of a grant id."""
    if not is_grant_id(grant_id):
        raise InvalidRecordError("grant_id", "is not a grant id (32 lowercase hex digits)")


# The columns the MAC covers (``storage.grant_seal.canonical``), and the MAC: one of
# them holding a value of a type medvault never stores makes the row forged. The others
# read as placeholders that fail where they are checked: a review by "" at the epoch
# does not open, a revocation at the epoch has taken effect.
_AUTHENTICATED = frozenset({
    "id", "patient_index", "principal", "granted_by", "created_at", "expires_at",
    "break_glass", "sealed_reason", "mac",
})  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class GrantRow:
    """A row read strictly (``storage.row_values``): the grant it says, its sealed text
    and MAC, its clear text (legacy rows), and the columns that held a value of a type
    medvault never stores."""

    grant: Grant
    sealed_reason: bytes | None
    sealed_comment: bytes | None
    mac: bytes | None
    reason: str | None  # clear text of a legacy row only
    review_comment: str | None
    malformed: tuple[str, ...]

    @property
    def forged(self) -> bool:
        """An authenticated column is malformed: the row grants nothing, whatever its MAC."""
        return not _AUTHENTICATED.isdisjoint(self.malformed)


def read_grant_row(row: Row[Any]) -> GrantRow:
    """``row`` as a :class:`GrantRow` (nothing verified)."""
    v = RowValues(row._mapping)
    grant = Grant(
        id=v.text("id"),
        patient_index=v.binary("patient_index"),
        principal=v.text("principal"),
        granted_by=v.text("granted_by"),
        created_at=v.time("created_at"),
        expires_at=v.optional_time("expires_at"),
        revoked_at=v.optional_time("revoked_at"),
        revoked_by=v.optional_text("revoked_by"),
        break_glass=v.boolean("break_glass"),
        reason=None,  # opened only for the review queue
        reviewed_at=v.optional_time("reviewed_at"),
        reviewed_by=v.optional_text("reviewed_by"),
        review_comment=None,
    )
    return GrantRow(
        grant, v.optional_binary("sealed_reason"), v.optional_binary("sealed_comment"),
        v.optional_binary("mac"), v.optional_text("reason"), v.optional_text("review_comment"),
        tuple(v.malformed),
    )  # fmt: skip


def row_to_grant(row: Row[Any]) -> Grant:
    """The grant a row says (not verified: ``SqlGrantStore`` checks its MAC and types)."""
    return read_grant_row(row).grant


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


class SqlGrantStore:
    """Grants in one SQL table; every statement is parameterised, every row verified."""

    def __init__(
        self,
        engine: Engine,
        sealer: GrantSealer,
        on_forged: Callable[[str], None] | None = None,
    ) -> None:
        self._engine = engine
        self._sealer = sealer
        self._on_forged = on_forged or (lambda _grant_id: None)

    @property
    def engine(self) -> Engine:
        """The database (the review queue reads the trail's events through it)."""
        return self._engine

    def report_forged(self, grant_id: str) -> None:
        """Report a grant row that is missing, altered or fails its MAC."""
        self._on_forged(grant_id)

    def grant(
        self,
        patient_index: bytes,
        principal: str,
        granted_by: str,
        expires_at: datetime | None,
        now: datetime,
    ) -> Grant:
        """Give ``principal`` care-team access to the patient, until ``expires_at`` if set."""
        grant = self.new_grant(patient_index, principal, granted_by, expires_at, now)
        return self._run(self.insert_change(grant), write=True)

    def new_grant(
        self,
        patient_index: bytes,
        principal: str,
        granted_by: str,
        expires_at: datetime | None,
        now: datetime,
    ) -> Grant:
        """A checked care-team grant, not stored yet (``insert_change`` stores it)."""
        _check_patient(patient_index)
        _check_actor("principal", principal)
        _check_actor("granted_by", granted_by)
        now = to_utc(now, "now")
        if expires_at is not None:
            expires_at = to_utc(expires_at, "expires_at")
            if expires_at <= now:
                raise InvalidRecordError("expires_at", "is not in the future")
        return _new(secrets.token_hex(16), patient_index, principal, granted_by, now, expires_at)

    def break_glass(
        self,
        patient_index: bytes,
        principal: str,
        reason: str,
        duration: timedelta,
        now: datetime,
    ) -> Grant:
        """Emergency access the principal gives itself: time-limited, reasoned, reviewed."""
        grant = self.new_break_glass(patient_index, principal, reason, duration, now)
        return self._run(self.insert_change(grant), write=True)

    def new_break_glass(
        self,
        patient_index: bytes,
        principal: str,
        reason: str,
        duration: timedelta,
        now: datetime,
    ) -> Grant:
        """A checked break-the-glass grant, not stored yet (``insert_change`` stores it)."""
        _check_patient(patient_index)
        _check_actor("principal", principal)
        _check_text("reason", reason)
        if not timedelta(0) < duration <= MAX_BREAK_GLASS_DURATION:
            raise InvalidRecordError(
                "duration", f"must be positive and at most {MAX_BREAK_GLASS_DURATION}"
            )
        now = to_utc(now, "now")
        grant_id = secrets.token_hex(16)
        # granted_by is the principal: nobody else is asked, that is the point of it.
        grant = _new(grant_id, patient_index, principal, principal, now, now + duration)
        return dataclasses.replace(grant, break_glass=True, reason=reason)

    def revoke(self, grant_id: str, revoked_by: str, now: datetime) -> Grant:
        """End a grant now; ``RecordConflictError`` if it was revoked already."""
        return self._run(self.revoke_change(grant_id, revoked_by, now), write=True)

    def revoke_change(
        self, grant_id: str, revoked_by: str, now: datetime
    ) -> Callable[[Connection], Grant]:
        """``revoke`` as a function of a connection (checked now, applied when called)."""
        check_grant_id(grant_id)
        _check_actor("revoked_by", revoked_by)
        now = to_utc(now, "now")
        # Conditional UPDATE: of two concurrent revocations exactly one wins.
        update = (
            access_grants.update()
            .where(access_grants.c.id == grant_id, access_grants.c.revoked_at.is_(None))
            .values(revoked_at=now, revoked_by=revoked_by)
        )
        return _update(grant_id, update, lambda _: "the grant is revoked already")

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
                if opened.answers(None, None, active_at):
                    listed.append((opened, False))
                else:  # authentic but expired or revoked: SQL saw other bytes
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

    def review(self, grant_id: str, reviewer: str, comment: str, now: datetime) -> Grant:
        """Mark a break-the-glass grant reviewed; once only, only break-the-glass, and
        never by the principal who broke the glass."""
        return self._run(self.review_change(grant_id, reviewer, comment, now), write=True)

    def review_change(
        self, grant_id: str, reviewer: str, comment: str, now: datetime
    ) -> Callable[[Connection], Grant]:
        """``review`` as a function of a connection (checked and sealed now, applied when
        called); the result has its reason and comment opened."""
        check_grant_id(grant_id)
        _check_actor("reviewer", reviewer)
        _check_text("comment", comment)
        now = to_utc(now, "now")
        sealed = self._sealer.seal_review(grant_id, reviewer, now, comment)
        update = (
            access_grants.update()
            .where(
                access_grants.c.id == grant_id,
                access_grants.c.break_glass == sa.true(),
                access_grants.c.reviewed_at.is_(None),
                access_grants.c.principal != reviewer,
            )
            .values(reviewed_at=now, reviewed_by=reviewer, sealed_comment=sealed)
        )
        apply = _update(grant_id, update, lambda g: _review_conflict(g, reviewer))

        def review(connection: Connection) -> Grant:
            reviewed = apply(connection)
            select = sa.select(access_grants).where(access_grants.c.id == grant_id)
            row = connection.execute(select).first()
            return reviewed if row is None else self._opened(row)

        return review

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
            if grant.answers(patient_index, principal, active_at):
                answering.append(grant)
            else:
                self._on_forged(grant.id)
        return answering

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

    def insert_change(self, grant: Grant) -> Callable[[Connection], Grant]:
        """Store ``grant`` (from ``new_grant``/``new_break_glass``) on a connection; the
        reason is sealed and the row MACed in the token now, outside the transaction."""
        sealed_reason = (
            self._sealer.seal_reason(grant.id, grant.reason)
            if grant.break_glass and grant.reason is not None
            else None
        )
        columns = access_grants.columns
        values = {column.name: getattr(grant, column.name, None) for column in columns}
        values.update(
            reason="" if grant.break_glass else None,  # the text itself is only sealed
            review_comment=None,
            sealed_reason=sealed_reason,
            mac=self._sealer.mac(grant, sealed_reason),
        )

        def insert(connection: Connection) -> Grant:
            connection.execute(access_grants.insert().values(**values))
            return grant

        return translated_change(insert)

    def _run(self, fn: Callable[[Connection], T], *, write: bool = False) -> T:
        return run_in_transaction(self._engine, fn, write=write)


def _update(
    grant_id: str, update: sa.Update, conflict: Callable[[Grant], str]
) -> Callable[[Connection], Grant]:
    """A conditional UPDATE returning the row; it tells why when it matched nothing.

    The UPDATE's own WHERE decides, so concurrent callers cannot both succeed; the
    re-read in the same transaction explains a miss (unknown id or wrong state).
    """

    def apply(connection: Connection) -> Grant:
        changed = connection.execute(update).rowcount
        select = sa.select(access_grants).where(access_grants.c.id == grant_id)
        row = connection.execute(select).first()
        if row is None:
            raise RecordNotFoundError("no such grant")
        grant = row_to_grant(row)
        if changed != 1:
            raise RecordConflictError(conflict(grant))
        return grant

    return translated_change(apply)


def _new(  # noqa: PLR0917  (one call site per kind of grant; names are at the calls)
    grant_id: str,
    patient_index: bytes,
    principal: str,
    granted_by: str,
    now: datetime,
    expires_at: datetime | None,
) -> Grant:
    return Grant(
        id=grant_id, patient_index=patient_index, principal=principal, granted_by=granted_by,
        created_at=now, expires_at=expires_at, revoked_at=None, revoked_by=None,
        break_glass=False, reason=None, reviewed_at=None, reviewed_by=None, review_comment=None,
    )  # fmt: skip


def _list_query(
    patient_index: bytes | None, principal: str | None, include_inactive: bool, now: datetime
) -> sa.Select[Any]:
    """The checked query of ``SqlGrantStore.list``: newest first."""
    if patient_index is None and principal is None:
        raise InvalidRecordError("patient_index", "give a patient, a principal or both")
    query = sa.select(access_grants)
    if patient_index is not None:
        _check_patient(patient_index)
        query = query.where(access_grants.c.patient_index == patient_index)
    if principal is not None:
        _check_actor("principal", principal)
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


def _review_conflict(grant: Grant, reviewer: str) -> str:
    if not grant.break_glass:
        return "only break-the-glass grants are reviewed"
    if grant.principal == reviewer:
        return "a principal cannot review their own break-the-glass access"
    return "the grant is reviewed already"
