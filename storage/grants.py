"""Care-team grants, break-the-glass access and its review queue, on SQL (SQLAlchemy Core).

One table, ``access_grants`` (migration ``0003``). The patient is its keyed blind
index; the store never sees a plaintext identifier. The break-the-glass ``reason`` and
the reviewer's ``review_comment`` are free text from people and may mention the patient:
they are stored in clear because the audit review must read them, and are never logged
nor put into an error message.

Times follow ``storage.sql_metadata``: stored in UTC, returned UTC-aware, naive input
refused. Every method takes ``now`` explicitly so that one request uses one clock
reading and tests need no sleeps.
"""

from __future__ import annotations

import builtins
import re
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, Row

from storage.errors import InvalidRecordError, RecordConflictError, RecordNotFoundError
from storage.grants_model import Grant
from storage.sql_metadata import (
    from_db_time,
    metadata,
    run_in_transaction,
    to_utc,
    translated_change,
)
from storage.validation import check_printable

MAX_PRINCIPAL_LENGTH = 128
MAX_TEXT_LENGTH = 1000  # reason and review comment
# The contract's ceiling for break-the-glass (access.proto); policy may ask for less.
MAX_BREAK_GLASS_DURATION = timedelta(hours=4)
PATIENT_INDEX_LENGTH = 32  # HMAC-SHA256
_GRANT_ID = re.compile(r"^[0-9a-f]{32}$")

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
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("revoked_by", sa.String(255), nullable=True),
    sa.Column("break_glass", sa.Boolean, nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("reviewed_by", sa.String(255), nullable=True),
    sa.Column("review_comment", sa.Text, nullable=True),
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


def _check_grant_id(grant_id: str) -> None:
    if not _GRANT_ID.match(grant_id):
        raise InvalidRecordError("grant_id", "is not a grant id (32 lowercase hex digits)")


def _optional_time(value: datetime | None) -> datetime | None:
    return None if value is None else from_db_time(value)


def _to_grant(row: Row[Any]) -> Grant:
    m = row._mapping
    return Grant(
        id=m["id"],
        patient_index=bytes(m["patient_index"]),
        principal=m["principal"],
        granted_by=m["granted_by"],
        created_at=from_db_time(m["created_at"]),
        expires_at=_optional_time(m["expires_at"]),
        revoked_at=_optional_time(m["revoked_at"]),
        revoked_by=m["revoked_by"],
        break_glass=bool(m["break_glass"]),
        reason=m["reason"],
        reviewed_at=_optional_time(m["reviewed_at"]),
        reviewed_by=m["reviewed_by"],
        review_comment=m["review_comment"],
    )


def _active_at(now: datetime) -> sa.ColumnElement[bool]:
    """The SQL form of ``Grant.active``: not revoked, and no expiry or expiring later."""
    return sa.and_(
        access_grants.c.revoked_at.is_(None),
        sa.or_(access_grants.c.expires_at.is_(None), access_grants.c.expires_at > now),
    )


class SqlGrantStore:
    """Grants in one SQL table; every statement is parameterised."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

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
        return Grant(
            id=secrets.token_hex(16),
            patient_index=patient_index,
            principal=principal,
            granted_by=granted_by,
            created_at=now,
            expires_at=expires_at,
            revoked_at=None,
            revoked_by=None,
            break_glass=False,
            reason=None,
            reviewed_at=None,
            reviewed_by=None,
            review_comment=None,
        )

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
        return Grant(
            id=secrets.token_hex(16),
            patient_index=patient_index,
            principal=principal,
            granted_by=principal,  # nobody else is asked: that is the point of it
            created_at=now,
            expires_at=now + duration,
            revoked_at=None,
            revoked_by=None,
            break_glass=True,
            reason=reason,
            reviewed_at=None,
            reviewed_by=None,
            review_comment=None,
        )

    def revoke(self, grant_id: str, revoked_by: str, now: datetime) -> Grant:
        """End a grant now; ``RecordConflictError`` if it was revoked already."""
        return self._run(self.revoke_change(grant_id, revoked_by, now), write=True)

    def revoke_change(
        self, grant_id: str, revoked_by: str, now: datetime
    ) -> Callable[[Connection], Grant]:
        """``revoke`` as a function of a connection (checked now, applied when called)."""
        _check_grant_id(grant_id)
        _check_actor("revoked_by", revoked_by)
        now = to_utc(now, "now")
        # Conditional UPDATE: of two concurrent revocations exactly one wins.
        update = (
            access_grants.update()
            .where(access_grants.c.id == grant_id, access_grants.c.revoked_at.is_(None))
            .values(revoked_at=now, revoked_by=revoked_by)
        )
        return _update(grant_id, update, lambda _: "the grant is revoked already")

    def has_access(self, principal: str, patient_index: bytes, now: datetime) -> Grant | None:
        """An active grant of ``principal`` on the patient, or ``None``.

        On the path of every read: one query on ``ix_access_grants_principal_patient``.
        A care-team grant is preferred to a break-the-glass one, so that a read the care
        team covers is not flagged as an emergency access.
        """
        query = (
            sa.select(access_grants)
            .where(
                access_grants.c.principal == principal,
                access_grants.c.patient_index == patient_index,
                _active_at(to_utc(now, "now")),
            )
            .order_by(access_grants.c.break_glass, access_grants.c.created_at.desc())
            .limit(1)
        )
        row = self._run(lambda c: c.execute(query).first())
        return None if row is None else _to_grant(row)

    def list(
        self,
        patient_index: bytes | None,
        principal: str | None,
        include_inactive: bool,
        now: datetime,
    ) -> list[Grant]:
        """Grants on a patient, of a principal, or both; newest first.

        At least one filter is required: an unfiltered listing would be a dump of who may
        see whom across the hospital.
        """
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
        query = query.order_by(access_grants.c.created_at.desc(), access_grants.c.id)
        rows = self._run(lambda c: c.execute(query).all())
        return [_to_grant(r) for r in rows]

    # builtins.list: inside the class body ``list`` names the method above.
    def break_glass_queue(self, include_reviewed: bool) -> builtins.list[Grant]:
        """Break-the-glass grants awaiting review, oldest first; then reviewed ones if asked."""
        unreviewed_first = sa.case((access_grants.c.reviewed_at.is_(None), 0), else_=1)
        query = sa.select(access_grants).where(access_grants.c.break_glass == sa.true())
        if not include_reviewed:
            query = query.where(access_grants.c.reviewed_at.is_(None))
        query = query.order_by(unreviewed_first, access_grants.c.created_at, access_grants.c.id)
        rows = self._run(lambda c: c.execute(query).all())
        return [_to_grant(r) for r in rows]

    def review(self, grant_id: str, reviewer: str, comment: str, now: datetime) -> Grant:
        """Mark a break-the-glass grant reviewed; once only, and only break-the-glass."""
        return self._run(self.review_change(grant_id, reviewer, comment, now), write=True)

    def review_change(
        self, grant_id: str, reviewer: str, comment: str, now: datetime
    ) -> Callable[[Connection], Grant]:
        """``review`` as a function of a connection (checked now, applied when called)."""
        _check_grant_id(grant_id)
        _check_actor("reviewer", reviewer)
        _check_text("comment", comment)
        now = to_utc(now, "now")
        update = (
            access_grants.update()
            .where(
                access_grants.c.id == grant_id,
                access_grants.c.break_glass == sa.true(),
                access_grants.c.reviewed_at.is_(None),
            )
            .values(reviewed_at=now, reviewed_by=reviewer, review_comment=comment)
        )
        return _update(
            grant_id,
            update,
            lambda g: (
                "the grant is reviewed already"
                if g.break_glass
                else "only break-the-glass grants are reviewed"
            ),
        )

    def get(self, grant_id: str) -> Grant:
        """One grant by id; ``RecordNotFoundError`` if there is none."""
        _check_grant_id(grant_id)
        query = sa.select(access_grants).where(access_grants.c.id == grant_id)
        row = self._run(lambda c: c.execute(query).first())
        if row is None:
            raise RecordNotFoundError("no such grant")
        return _to_grant(row)

    @staticmethod
    def insert_change(grant: Grant) -> Callable[[Connection], Grant]:
        """Store ``grant`` (from ``new_grant``/``new_break_glass``) on a connection."""
        values = {column.name: getattr(grant, column.name) for column in access_grants.columns}

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
        grant = _to_grant(row)
        if changed != 1:
            raise RecordConflictError(conflict(grant))
        return grant

    return translated_change(apply)
