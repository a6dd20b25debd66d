"""Master-key (KEK) lifecycle: rotate, list, rewrap data keys, retire (docs/keys.md).

Rotation creates KEK v(N+1) in the token; new writes use it at once in the rotating
process and within ``Pkcs11KeyWrapper``'s refresh interval everywhere else. The rewrap
job then moves each record's wrapped data key (DEK) from its old version to the
newest: unwrap inside the token with the old KEK, wrap with the new one under the same
associated data, update the row. The object data is never touched: the DEK itself
does not change, only the key that protects it.

The job (``storage.kek_rewrap``) keeps no state of its own: the rows are the state, so
a crash or a cancelled stream resumes by running it again.

Retirement marks the version ``retired`` in ``kek_versions``: nothing wraps with it any
more, and the records insert checks the same row in its own transaction
(``storage.sql_metadata``, ``storage.kek_state``), so a write that wrapped with a
version being retired fails and is wrapped again, instead of committing a key under a
retired version. The key itself stays on the token: database backups still hold rows
wrapped by it, and a restore needs it. Destroying it is a separate, explicit step
(``destroy_key``), for when no backup within retention holds keys wrapped by it any
more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from keystore import KeyWrapper
from storage.errors import (
    InvalidRecordError,
    KekInUseError,
    RecordNotFoundError,
)
from storage.kek_rewrap import RewrapJob, count_below
from storage.kek_state import kek_insert_ignoring_duplicates
from storage.pg_loads import lenient_loads
from storage.reseal import LegacyResealer, Upgrade, count_legacy
from storage.row_values import MAX_VERSION, RowValues
from storage.sql_engine import translated, translated_change
from storage.sql_schema import kek_versions, records

# Re-exported: the rewrap job is started here (KekManager.rewrap) and imported with it.
__all__ = [
    "DEFAULT_BATCH",
    "MAX_BATCH",
    "Committer",
    "KekManager",
    "KekRing",
    "KekVersionInfo",
    "RewrapJob",
]

# Commits a state change (a function of a connection) with its audit event, in one
# transaction (the service's audit trail); None commits the change on its own.
Committer = Callable[[Callable[[Connection], None]], None]

DEFAULT_BATCH = 200
MAX_BATCH = 5000

log = logging.getLogger(__name__)


class KekRing(Protocol):
    """The master-key versions on the token: list, create, make current, destroy."""

    def versions(self) -> list[int]:
        """KEK versions on the token, oldest first."""
        ...

    def current_version(self) -> int:
        """The version new wraps use in this process."""
        ...

    def refresh(self) -> int:
        """Rescan the token and return the (new) current version."""
        ...

    def create_version(self, version: int) -> None:
        """Create KEK ``version`` on the token and make it current in this process."""
        ...

    def destroy_version(self, version: int) -> bool:
        """Delete KEK ``version`` from the token; True if it was there."""
        ...


@dataclass(frozen=True, slots=True)
class KekVersionInfo:
    """One KEK version: its state and how many wrapped data keys it still protects."""

    version: int
    state: str
    wrapped_keys: int
    created_at: datetime


class KekManager:
    """Use cases of the master-key lifecycle over the token and the metadata database."""

    def __init__(
        self, engine: Engine, wrapper: KeyWrapper, ring: KekRing, *, upgrade: Upgrade | None = None
    ) -> None:
        self._engine = engine
        self._wrapper = wrapper
        self._ring = ring
        # Re-seals one legacy row (``RecordStore.upgrade_sealed``): rewrap's last phase.
        self._upgrade = upgrade

    def sync(self) -> int:
        """Register the token's versions; mark the newest active. Return it."""
        current = self._ring.refresh()
        versions = self._ring.versions()
        with translated(self._engine), self._engine.begin() as connection:
            for version in versions:
                kek_insert_ignoring_duplicates(connection, version, "previous")
            _mark_active(connection, current)
        return current

    def rotate(
        self, commit: Callable[[int, Callable[[Connection], None]], None] | None = None
    ) -> KekVersionInfo:
        """Create KEK v(N+1) and make it current; ``RecordConflictError`` if raced.

        ``commit(version, claim)`` commits the claim of the number with its audit event
        (one transaction) before the key is created on the token: no key without its
        event.
        """
        current = self.sync()
        with (
            translated(self._engine),
            self._engine.connect() as connection,
            lenient_loads(connection),
        ):
            known = connection.scalars(sa.select(kek_versions.c.version)).all()
        # A version of another type (a database writer's) or out of range names no KEK:
        # not counted, and never int() of it (its value in the error). SQLite's max()
        # would return it.
        version = max([current, *(v for v in known if _in_range(v))]) + 1
        # Claim the number first: a second replica rotating now hits the primary key
        # and fails, instead of creating a second key with the same label.
        claim = translated_change(lambda c: _claim(c, version))
        if commit is None:
            with translated(self._engine), self._engine.begin() as connection:
                claim(connection)
        else:
            commit(version, claim)
        try:
            self._ring.create_version(version)
        except BaseException:
            self._unclaim(version)
            raise
        self.sync()
        return self._info(version)

    def _unclaim(self, version: int) -> None:
        with translated(self._engine), self._engine.begin() as connection:
            connection.execute(kek_versions.delete().where(kek_versions.c.version == version))

    def list(self) -> list[KekVersionInfo]:
        """Every known version, oldest first, with its state and wrapped-key count."""
        self.sync()
        with (
            translated(self._engine),
            self._engine.connect() as connection,
            lenient_loads(connection),  # a time psycopg cannot load: a malformed row
        ):
            rows = connection.execute(sa.select(kek_versions).order_by(kek_versions.c.version))
            states = [row._mapping for row in rows]
            counts = _counts(connection)
        listed = []
        for s in states:
            v = RowValues(s)
            version, state, created_at = v.version("version"), v.text("state"), v.time("created_at")
            if v.malformed:
                # Names no KEK: left out, logged by column. The token's own versions
                # were registered by sync() above, so the token still lists them all.
                log.warning(
                    "kek_versions row left out: a value of another type than its column's, "
                    "or out of its range (%s)",
                    ", ".join(v.malformed),
                )
                continue
            listed.append(KekVersionInfo(version, state, counts.get(version, 0), created_at))
        return listed

    def _info(self, version: int) -> KekVersionInfo:
        for info in self.list():
            if info.version == version:
                return info
        raise RecordNotFoundError(f"no KEK version {version}")

    def rewrap(self, from_version: int = 0, batch_size: int = DEFAULT_BATCH) -> RewrapJob:
        """A job moving keys to the current version; run ``step()`` until ``done``."""
        if not 1 <= batch_size <= MAX_BATCH:
            raise InvalidRecordError("batch_size", f"must be 1 to {MAX_BATCH}")
        target = self.sync()
        if from_version >= target:
            raise InvalidRecordError(
                "from_version", f"must be older than the active KEK version {target}"
            )
        job = RewrapJob(self._engine, self._wrapper, target, from_version, batch_size)
        job.remaining = count_below(self._engine, target, from_version)
        if self._upgrade is not None and not from_version:
            job.reseal = LegacyResealer(self._engine, self._upgrade)
        job.keys_done = job.remaining == 0
        job.done = job.keys_done and (job.reseal is None or count_legacy(self._engine) == 0)
        return job

    def retire(
        self, version: int, *, destroy_key: bool = False, commit: Committer | None = None
    ) -> KekVersionInfo:
        """Mark ``version`` retired (no new wraps); refused while in use or active.

        ``commit`` commits the retirement with its audit event (one transaction),
        before the key is destroyed if asked: no event, no retirement, no deletion.

        The key stays on the token unless ``destroy_key``: backups of the database hold
        rows wrapped by it, and restoring one needs it. Destroy it only once no backup
        within retention holds such rows; retiring again with ``destroy_key`` does so
        for a version retired earlier.
        """
        if version < 1:
            raise InvalidRecordError("version", "must be at least 1")
        active = self.sync()
        if version >= active:
            raise KekInUseError(
                f"KEK version {version} is the active one (new writes use it); "
                "rotate first, rewrap, then retire it"
            )
        mark = translated_change(lambda c: _mark_retired(c, version))
        if commit is None:
            with translated(self._engine), self._engine.begin() as connection:
                mark(connection)
        else:
            commit(mark)
        if destroy_key:
            # After the commit nothing can start using it; an interrupted deletion is
            # finished by retiring again.
            self._ring.destroy_version(version)
        return self._info(version)


def _claim(connection: Connection, version: int) -> None:
    connection.execute(
        kek_versions.insert().values(
            version=version, state="previous", created_at=datetime.now(UTC)
        )
    )


def _mark_active(connection: Connection, current: int) -> None:
    """The token's newest version is active; any other active one becomes previous."""
    connection.execute(
        kek_versions.update()
        .where(kek_versions.c.state == "active", kek_versions.c.version != current)
        .values(state="previous")
    )
    connection.execute(
        kek_versions.update()
        .where(kek_versions.c.version == current, kek_versions.c.state != "retired")
        .values(state="active")
    )


def _mark_retired(connection: Connection, version: int) -> None:
    """Mark retired, then count users in the same transaction; raise (roll back) if any.

    The row is locked first: FOR UPDATE on PostgreSQL, which waits for every insert
    holding the version's key-share lock (``storage.kek_state``) and makes later
    ones wait for this transaction; the write lock on SQLite. So an insert that commits
    after this sees ``retired`` and fails, and one that committed before is counted here.
    """
    state = connection.scalar(
        sa.select(kek_versions.c.state).where(kek_versions.c.version == version).with_for_update()
    )
    if state is None:
        raise RecordNotFoundError(f"no KEK version {version}; list them with `medvault keys keks`")
    if state == "retired":
        return
    connection.execute(
        kek_versions.update()
        .where(kek_versions.c.version == version)
        .values(state="retired", retired_at=datetime.now(UTC))
    )
    # Index range on ix_records_kek_version: short, as it runs under the lock.
    used = connection.scalar(
        sa.select(sa.func.count()).select_from(records).where(records.c.kek_version == version)
    )
    if used:
        raise KekInUseError(
            f"{used} wrapped keys still use KEK version {version}; run "
            "`medvault keys rewrap`, then retire it"
        )


def _counts(connection: Connection) -> dict[int, int]:
    """Wrapped data keys per KEK version, over every table that stores them."""
    query = sa.select(records.c.kek_version, sa.func.count()).group_by(records.c.kek_version)
    # A version that is not an integer (a database writer's) names no KEK: not counted.
    return {version: n for version, n in connection.execute(query) if _in_range(version)}


def _in_range(version: object) -> bool:
    """An integer KEK version, 1 to ``MAX_VERSION`` (its column's range; the token
    numbers from 1): anything else in the database names no KEK."""
    return type(version) is int and 0 < version <= MAX_VERSION
