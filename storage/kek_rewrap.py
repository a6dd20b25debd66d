"""The rewrap job: move each record's wrapped data key (DEK) to the newest master key
(KEK) version, one batch (one transaction) per step (docs/keys.md).

Unwrap inside the token with the old KEK, wrap with the new one under the same
associated data, update the row. The object data is never touched: the DEK itself
does not change, only the key that protects it.

The job keeps no state of its own: the rows are the state (``kek_version`` below the
target means "still to do"), so a crash or a cancelled stream resumes by running the
job again. Updates are optimistic (``WHERE kek_version = old``): a row changed
concurrently is skipped and found again by the next pass. A row whose key fails to
unwrap (a token hiccup, or tampering) is tried again in the next pass; only rows that
fail in the last pass are reported.

Once every key is moved, legacy sealed metadata is upgraded to v2 (``storage.reseal``)
as the job's last phase. ``KekManager.rewrap`` (``storage.kek``) starts a job.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore import KeyWrapper, UnwrapError, WrappedKey
from storage.errors import KekRetiredError
from storage.kek_state import kek_state
from storage.pg_loads import lenient_loads
from storage.reseal import LegacyResealer
from storage.row_auth import associated_data
from storage.row_values import RowValues
from storage.sql_engine import translated
from storage.sql_schema import records
from storage.sqlite_text import bindable, text_as_read

# Under the lifecycle's name, as before the job had a module of its own (the JSON log
# lines name their logger: service.logs).
log = logging.getLogger("storage.kek")


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
        # that is not UTF-8, read replaced and bound back, would start it there again);
        # a value psycopg cannot load reads as a malformed one (storage.pg_loads).
        with (
            translated(self.engine),
            self.engine.connect() as connection,
            text_as_read(connection),
            lenient_loads(connection),
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
            old = WrappedKey(kek_version=v.version("kek_version"), blob=v.binary("wrapped_dek"))
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
        with translated(self.engine), self.engine.begin() as connection, lenient_loads(connection):
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
