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

The table, the forms of its fields and its rows read strictly are ``storage.grant_rows``;
the reads, every row verified, and the officer's views are ``storage.grant_reads``
(``GrantReader``); ``SqlGrantStore`` here adds the writes: checked, sealed, MACed.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from storage.errors import (
    InvalidRecordError,
    RecordConflictError,
    RecordNotFoundError,
)
from storage.grant_reads import (
    ALTERED_MARK,
    LEGACY_MARK,
    REASON_UNREADABLE_MARK,
    REVIEW_ALTERED_MARK,
    GrantReader,
)
from storage.grant_revocations import revoked_row_markers
from storage.grant_rows import (
    access_grants,
    check_actor,
    check_grant_id,
    check_patient,
    check_text,
    is_grant_id,
    row_to_grant,
)
from storage.grants_model import Grant
from storage.sql_engine import translated_change
from storage.sql_metadata import to_utc

# Re-exported: callers import the table and the officer's marks with the store.
__all__ = [
    "ALTERED_MARK",
    "GRANT_ADOPTER",
    "LEGACY_MARK",
    "MAX_BREAK_GLASS_DURATION",
    "REASON_UNREADABLE_MARK",
    "REVIEW_ALTERED_MARK",
    "SqlGrantStore",
    "access_grants",
]

# The contract's ceiling for break-the-glass (access.proto); policy may ask for less.
MAX_BREAK_GLASS_DURATION = timedelta(hours=4)
# Rows read at a time by ``mark_revoked_rows``.
_MARK_BATCH = 500
# The Alembic attribute through which migration 0009 adopts legacy rows (see below).
GRANT_ADOPTER = "medvault.grant_adopter"


class SqlGrantStore(GrantReader):
    """Grants in one SQL table; every statement is parameterised, every row verified.

    Checks, seals and stores grants, revocations and reviews; the reads are
    ``GrantReader``'s (``storage.grant_reads``)."""

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
        check_patient(patient_index)
        check_actor("principal", principal)
        check_actor("granted_by", granted_by)
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
        check_patient(patient_index)
        check_actor("principal", principal)
        check_text("reason", reason)
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
        """``revoke`` as a function of a connection (checked, and its revocation marker
        written, now; applied when called)."""
        check_grant_id(grant_id)
        check_actor("revoked_by", revoked_by)
        now = to_utc(now, "now")
        if self._revocations is not None:
            # The marker first, outside the database (storage.grant_revocations): no
            # revocation commits without the record a database writer cannot take back.
            self._revocations.record(grant_id, now)
        # Conditional UPDATE: of two concurrent revocations exactly one wins.
        update = (
            access_grants.update()
            .where(access_grants.c.id == grant_id, access_grants.c.revoked_at.is_(None))
            .values(revoked_at=now, revoked_by=revoked_by)
        )
        return _update(grant_id, update, lambda _: "the grant is revoked already")

    def mark_revoked_rows(self, now: datetime) -> int:
        """Write the missing revocation marker of every authentic revoked row; how many.

        Called once at start, after the markers are loaded. A revocation this release
        commits has its marker already; one committed by a release before the markers,
        or held by a database restored under another record bucket's name (whose markers
        are under the old name), had none, and clearing its ``revoked_at`` gave access
        back (cold review 11b). One query of the revoked ids; the rows without a marker
        are then read and their MAC checked (a token operation each, so once per grant:
        later starts find the markers), so that a database writer's rows never become
        locked objects. Dated as the row says, but never after ``now``.
        """
        revocations = self._revocations
        if revocations is None:
            return 0
        now = to_utc(now, "now")
        revoked = access_grants.c.revoked_at.is_not(None)
        ids = self._run(lambda c: c.execute(sa.select(access_grants.c.id).where(revoked)).all())
        # Each id once, and only ids of the form the service makes: a writer who drops
        # the primary key and copies a revoked row made every batch read every copy
        # (quadratic start-up) and each copy count (cold review 11d).
        missing = sorted({
            i for (i,) in ids
            if isinstance(i, str) and is_grant_id(i) and revocations.revoked_at(i) is None
        })  # fmt: skip
        marked: set[str] = set()
        for start in range(0, len(missing), _MARK_BATCH):
            batch = missing[start : start + _MARK_BATCH]
            query = sa.select(access_grants).where(revoked, access_grants.c.id.in_(batch))
            # An inauthentic row grants nothing already; it is reported where it is read.
            for marker in revoked_row_markers(self._run(_all_rows(query)), self._sealer, now):
                if marker.grant_id not in marked:
                    revocations.record(marker.grant_id, marker.revoked_at)
                    marked.add(marker.grant_id)
        return len(marked)

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
        check_actor("reviewer", reviewer)
        check_text("comment", comment)
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


def _all_rows(query: sa.Select[Any]) -> Callable[[Connection], Sequence[Row[Any]]]:
    return lambda connection: connection.execute(query).all()


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


def _review_conflict(grant: Grant, reviewer: str) -> str:
    if not grant.break_glass:
        return "only break-the-glass grants are reviewed"
    if grant.principal == reviewer:
        return "a principal cannot review their own break-the-glass access"
    return "the grant is reviewed already"
