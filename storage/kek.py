"""Master-key (KEK) lifecycle: rotate, list, rewrap data keys, retire (docs/keys.md).

Rotation creates KEK v(N+1) in the token; new writes use it at once in the rotating
process and within ``Pkcs11KeyWrapper``'s refresh interval everywhere else. The rewrap
job then moves each record's wrapped data key (DEK) from its old version to the
newest: unwrap inside the token with the old KEK, wrap with the new one under the same
associated data, update the row. The object data is never touched: the DEK itself
does not change, only the key that protects it.

The job keeps no state of its own: the rows are the state (``kek_version`` below the
target means "still to do"), so a crash or a cancelled stream resumes by running the
job again. Updates are optimistic (``WHERE kek_version = old``): a row changed
concurrently is skipped and found again by the next pass. A row whose key fails to
unwrap (a token hiccup, or tampering) is tried again in the next pass; only rows that
fail in the last pass are reported.

Retirement marks the version ``retired`` in ``kek_versions``: nothing wraps with it any
more, and the records insert checks the same row in its own transaction
(``storage.sql_metadata``), so a write that wrapped with a version being retired fails
and is wrapped again, instead of committing a key under a retired version. The key
itself stays on the token: database backups still hold rows wrapped by it, and a
restore needs it. Destroying it is a separate, explicit step (``destroy_key``), for
when no backup within retention holds keys wrapped by it any more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from keystore import KeyWrapper, UnwrapError, WrappedKey
from storage.errors import (
    InvalidRecordError,
    KekInUseError,
    KekRetiredError,
    RecordNotFoundError,
)
from storage.reseal import LegacyResealer, Upgrade, count_legacy
from storage.row_auth import associated_data
from storage.row_values import RowValues
from storage.sql_metadata import (
    kek_insert_ignoring_duplicates,
    kek_state,
    kek_versions,
    records,
    translated,
    translated_change,
)
from storage.sqlite_text import bindable, text_as_read

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


@dataclass(frozen=True, slots=True)
class RewrapProgress:
    """Where a rewrap job stands."""

    rewrapped: int
    remaining: int
    target_version: int
    failed: int = 0
    resealed: int = 0  # legacy (v1) sealed metadata upgraded to v2 (storage.reseal)


@dataclass
class _Pass:
    """Keyset position of the current pass over the rows still to rewrap (the id as
    stored: ``sqlite_text.bindable``)."""

    after: tuple[object, object] | None = None
    moved: int = 0
    # Keys below the target when the pass began (its first step): the next pass runs only
    # if the database holds fewer now, not merely because updates reported rows moved.
    left_before: int | None = None
    failed: set[tuple[object, object]] = field(default_factory=set)


@dataclass
class RewrapJob:
    """Moves wrapped data keys to ``target`` one batch (one transaction) per ``step()``."""

    engine: Engine
    wrapper: KeyWrapper
    target: int
    from_version: int
    batch_size: int
    remaining: int = 0
    rewrapped: int = 0
    # Rows whose key failed to unwrap in every pass so far (the last pass, once done).
    failed_ids: set[tuple[object, object]] = field(default_factory=set)
    done: bool = False
    # The last phase, once every key is moved: legacy sealed metadata upgraded to v2.
    reseal: LegacyResealer | None = None
    keys_done: bool = False
    _pass: _Pass = field(default_factory=_Pass)

    def progress(self) -> RewrapProgress:
        """The counts so far (failures: of the previous pass and of this one so far)."""
        failed = self.failed_ids | self._pass.failed
        resealed = 0
        if self.reseal is not None:
            failed, resealed = failed | self.reseal.failed, self.reseal.resealed
        return RewrapProgress(self.rewrapped, self.remaining, self.target, len(failed), resealed)

    def step(self) -> RewrapProgress:
        """Rewrap one batch; at the end of a pass, recount and start another if needed."""
        if self.done:
            return self.progress()
        if self.keys_done and self.reseal is not None:
            self.reseal.step(self.batch_size)
            self.done = self.reseal.finished
            return self.progress()
        if self._pass.left_before is None:
            self._pass.left_before = self.remaining
        rows = self._select()
        if not rows:
            self._end_pass()
            return self.progress()
        self._pass.after = (bindable(rows[-1]["id"]), rows[-1]["version"])
        moved = self._apply(self._rewrapped(rows))
        self._pass.moved += moved
        self.rewrapped += moved
        self.remaining = max(self.remaining - moved, 0)
        return self.progress()

    def _end_pass(self) -> None:
        """A pass found no more rows: done, unless rows are left and this pass made
        progress; then another pass takes stragglers and retries this pass's failures."""
        left = count_below(self.engine, self.target, self.from_version)
        self.remaining = left
        self.failed_ids = self._pass.failed  # a row that failed before but not now is fine
        # A pass whose updates all reported a row moved, while the count below the target
        # did not fall, met rows put back behind it (a database writer's trigger): another
        # pass would unwrap and wrap the same keys in the token for ever. The job ends
        # with those keys remaining (the version cannot be retired while they are).
        stalled = self._pass.left_before is not None and left >= self._pass.left_before
        if stalled and self._pass.moved:
            log.warning(
                "rewrap pass moved keys but none fewer remain below the target: rows were "
                "changed back outside medvault; stopping",
                extra={"moved": self._pass.moved, "remaining": left},
            )
        if left == 0 or self._pass.moved == 0 or stalled:
            self.keys_done = True
            self.done = self.reseal is None
        self._pass = _Pass()

    def _where(self) -> sa.ColumnElement[bool]:
        condition = _below(self.target, self.from_version)
        if self._pass.after is not None:
            key = sa.tuple_(records.c.id, records.c.version)
            condition = sa.and_(condition, key > sa.tuple_(*self._pass.after))
        return condition

    def _select(self) -> Sequence[Any]:
        query = (
            sa.select(records.c.id, records.c.version, records.c.kek_version, records.c.wrapped_dek)
            .where(self._where())
            .order_by(records.c.id, records.c.version)
            .limit(self.batch_size)
        )
        # Ids as stored: the next batch starts past the last, whatever its bytes (an id
        # that is not UTF-8, read replaced and bound back, would start it there again).
        with translated(self.engine), self.engine.connect() as connection, text_as_read(
            connection
        ):
            return [row._mapping for row in connection.execute(query)]

    def _rewrapped(self, rows: Sequence[Any]) -> list[tuple[Any, WrappedKey]]:
        """Unwrap each key with its version and wrap it with the current one, in the token."""
        out = []
        for row in rows:
            # Read strictly (storage.row_values): text that is not UTF-8, or a value of a
            # type medvault never stores (bytes() of an integer would allocate that many
            # bytes), is not the service's row.
            v = RowValues(row)
            ad_of = v.text("id"), v.version("version")
            old = WrappedKey(kek_version=v.integer("kek_version"), blob=v.binary("wrapped_dek"))
            if v.malformed:
                self._pass.failed.add((row["id"], row["version"]))
                continue
            ad = associated_data(*ad_of)
            try:
                dek = self.wrapper.unwrap(old, ad)
            except UnwrapError:
                # Tampered, or the token failed twice: tried again in the next pass, and
                # reported if it fails in the last one.
                self._pass.failed.add((row["id"], row["version"]))
                continue
            out.append((row, self.wrapper.wrap(dek, ad)))
        return out

    def _apply(self, pairs: list[tuple[Any, WrappedKey]]) -> int:
        """Update the batch in one transaction; a row changed meanwhile is skipped."""
        if not pairs:
            return 0
        moved = 0
        with translated(self.engine), self.engine.begin() as connection:
            for row, new in pairs:
                result = connection.execute(
                    records.update()
                    .where(
                        records.c.id == row["id"],
                        records.c.version == row["version"],
                        records.c.kek_version == row["kek_version"],
                    )
                    .values(kek_version=new.kek_version, wrapped_dek=new.blob)
                )
                moved += result.rowcount
            # A rotation and retirement elsewhere could have overtaken this batch: never
            # commit keys wrapped by a retired version (the job fails; run it again).
            for version in {new.kek_version for _, new in pairs}:
                if kek_state(connection, version) == "retired":
                    raise KekRetiredError(f"KEK version {version} was retired during rewrap")
        return moved


def _below(target: int, from_version: int) -> sa.ColumnElement[bool]:
    """Rows still to rewrap: below ``target``, or exactly ``from_version`` if given."""
    if from_version:
        return records.c.kek_version == from_version
    return records.c.kek_version < target


def count_below(engine: Engine, target: int, from_version: int = 0) -> int:
    """Wrapped keys on versions older than ``target`` (or on ``from_version`` only)."""
    query = sa.select(sa.func.count()).select_from(records).where(_below(target, from_version))
    with translated(engine), engine.connect() as connection:
        return int(connection.scalar(query) or 0)


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
        with translated(self._engine), self._engine.connect() as connection:
            known = connection.scalars(sa.select(kek_versions.c.version)).all()
        # A version of another type (a database writer's) names no KEK: not counted, and
        # never int() of it (its value in the error). SQLite's max() would return it.
        version = max([current, *(v for v in known if type(v) is int)]) + 1
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
        with translated(self._engine), self._engine.connect() as connection:
            rows = connection.execute(sa.select(kek_versions).order_by(kek_versions.c.version))
            states = [row._mapping for row in rows]
            counts = _counts(connection)
        listed = []
        for s in states:
            v = RowValues(s)
            version, state, created_at = v.integer("version"), v.text("state"), v.time("created_at")
            if v.malformed:
                # Names no KEK: left out, logged by column. The token's own versions
                # were registered by sync() above, so the token still lists them all.
                log.warning(
                    "kek_versions row left out: a value of another type than its column's (%s)",
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
    holding the version's key-share lock (``sql_metadata.kek_state``) and makes later
    ones wait for this transaction; the write lock on SQLite. So an insert that commits
    after this sees ``retired`` and fails, and one that committed before is counted here.
    """
    state = connection.scalar(
        sa.select(kek_versions.c.state)
        .where(kek_versions.c.version == version)
        .with_for_update()
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
    return {version: n for version, n in connection.execute(query) if type(version) is int}
