"""The records insert never commits a key wrapped by a retired KEK version.

Storage level, on SQLite and PostgreSQL, with a stand-in token (no key is touched):
a put that wrapped with v1 just before v1 was retired is refused by the insert guard,
and ``RecordStore`` wraps the same data key again with the current version. On
PostgreSQL the two interleavings of a concurrent insert and retirement are forced
with two connections.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore.errors import UnwrapError
from keystore.interfaces import WrappedKey
from storage.errors import KekInUseError, KekRetiredError
from storage.interfaces import StoredRecord
from storage.kek import KekManager, _mark_retired
from storage.sql_metadata import SqlMetadataStore, _insert_guarded, make_engine, records, upgrade
from tests.fixtures.databases import new_database

pytestmark = pytest.mark.integration


class FakeRing:
    """Versions 1 and 2 on a pretend token; 2 is current."""

    def __init__(self) -> None:
        self.on_token = [1, 2]
        self.destroyed: list[int] = []

    def versions(self) -> list[int]:
        return list(self.on_token)

    def current_version(self) -> int:
        return self.on_token[-1]

    def refresh(self) -> int:
        return self.on_token[-1]

    def create_version(self, version: int) -> None:
        self.on_token.append(version)

    def destroy_version(self, version: int) -> bool:
        self.destroyed.append(version)
        self.on_token.remove(version)
        return True


class FakeWrapper:
    """Wraps with the ring's current version; the blob is the key (no token here)."""

    def __init__(self, ring: FakeRing) -> None:
        self.ring = ring
        self.refreshed = 0

    def wrap(self, dek: bytes, associated_data: bytes) -> WrappedKey:
        return WrappedKey(self.ring.current_version(), dek)

    def unwrap(self, wrapped: WrappedKey, associated_data: bytes) -> bytes:
        return wrapped.blob

    def refresh(self) -> int:
        self.refreshed += 1
        return self.ring.current_version()


@pytest.fixture
def engine(
    request: pytest.FixtureRequest, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    for url in new_database(request, database_url, tmp_path_factory, migrated=True):
        engine = make_engine(url)
        upgrade(engine)
        yield engine
        engine.dispose()


def _row(record_id: str, kek_version: int) -> StoredRecord:
    return StoredRecord(
        id=record_id, version=1, kind="OTHER", content_type="text/plain",
        patient_index=b"\x01" * 32, sealed_meta=b"sealed", object_key=f"objects/{record_id}",
        kek_version=kek_version, wrapped_dek=b"k" * 32, size=1, stored_size=40,
        ciphertext_sha256=b"\x02" * 32, segment_size=1 << 20,
        created_at=datetime.now(UTC), created_by="test", supersedes_version=None,
    )  # fmt: skip


def _values(row: StoredRecord) -> dict[str, Any]:
    return {c.name: getattr(row, c.name) for c in records.columns}


def test_insert_with_retired_version_is_refused(engine: Engine) -> None:
    ring = FakeRing()
    manager = KekManager(engine, FakeWrapper(ring), ring)
    metadata = SqlMetadataStore(engine)
    wrapped_before = _row("a" * 32, kek_version=1)  # wrapped with v1 ...
    manager.retire(1)  # ... which is retired before the row commits
    assert ring.destroyed == []  # the key stays for restoring backups
    with pytest.raises(KekRetiredError):
        metadata.insert(wrapped_before)
    with engine.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(records)) == 0
    metadata.insert(replace(wrapped_before, kek_version=2))  # rewrapped: accepted


def test_store_rewraps_and_retries_once(engine: Engine) -> None:
    """``RecordStore._insert``: the same data key, wrapped again with the current KEK."""
    from storage.records import RecordStore  # noqa: PLC0415

    ring = FakeRing()
    wrapper = FakeWrapper(ring)
    KekManager(engine, wrapper, ring).retire(1)
    store = RecordStore(None, SqlMetadataStore(engine), wrapper, None)  # type: ignore[arg-type]
    store._insert(_row("b" * 32, kek_version=1), b"k" * 32, b"ad")
    with engine.connect() as connection:
        stored = connection.execute(sa.select(records.c.kek_version)).scalar_one()
    assert stored == 2
    assert wrapper.refreshed == 1


def test_retire_refused_while_a_row_uses_the_version(engine: Engine) -> None:
    ring = FakeRing()
    manager = KekManager(engine, FakeWrapper(ring), ring)
    SqlMetadataStore(engine).insert(_row("c" * 32, kek_version=1))
    with pytest.raises(KekInUseError):
        manager.retire(1)
    assert ring.destroyed == []
    assert {v.version: v.state for v in manager.list()} == {1: "previous", 2: "active"}


def test_retire_keeps_the_key_unless_destroy_key(engine: Engine) -> None:
    ring = FakeRing()
    ring.create_version(3)
    manager = KekManager(engine, FakeWrapper(ring), ring)
    assert manager.retire(1).state == "retired"
    assert ring.on_token == [1, 2, 3]
    assert manager.retire(2, destroy_key=True).state == "retired"
    assert ring.destroyed == [2]
    # A version retired earlier: its key is destroyed by retiring it again with the flag.
    assert manager.retire(1, destroy_key=True).state == "retired"
    assert ring.destroyed == [2, 1]
    assert {v.version: v.state for v in manager.list()} == {1: "retired", 2: "retired", 3: "active"}


class FlakyWrapper(FakeWrapper):
    """Unwrapping fails for the blobs in ``failing``, ``times`` times each (or always)."""

    def __init__(self, ring: FakeRing, failing: set[bytes], times: int | None) -> None:
        super().__init__(ring)
        self.failing = failing
        self.times = times
        self.calls: dict[bytes, int] = {}

    def unwrap(self, wrapped: WrappedKey, associated_data: bytes) -> bytes:
        n = self.calls[wrapped.blob] = self.calls.get(wrapped.blob, 0) + 1
        if wrapped.blob in self.failing and (self.times is None or n <= self.times):
            raise UnwrapError("wrapped key failed to authenticate")
        return wrapped.blob


def _rewrap_rows(engine: Engine, wrapper: FlakyWrapper, ring: FakeRing) -> Any:
    for i in range(5):
        row = replace(_row(f"{i:032x}", kek_version=1), wrapped_dek=bytes([i]) * 32)
        SqlMetadataStore(engine).insert(row)
    job = KekManager(engine, wrapper, ring).rewrap(batch_size=2)
    while not job.done:
        job.step()
    return job


def test_rewrap_retries_a_failed_unwrap_in_the_next_pass(engine: Engine) -> None:
    ring = FakeRing()
    wrapper = FlakyWrapper(ring, {bytes([3]) * 32}, times=1)  # one hiccup
    job = _rewrap_rows(engine, wrapper, ring)
    assert job.failed_ids == set()
    assert job.progress().failed == 0
    assert (job.rewrapped, job.remaining) == (5, 0)
    assert wrapper.calls[bytes([3]) * 32] == 2


def test_rewrap_reports_rows_that_fail_in_every_pass(engine: Engine) -> None:
    ring = FakeRing()
    wrapper = FlakyWrapper(ring, {bytes([1]) * 32, bytes([4]) * 32}, times=None)  # tampered
    job = _rewrap_rows(engine, wrapper, ring)
    assert job.failed_ids == {(f"{1:032x}", 1), (f"{4:032x}", 1)}
    assert (job.rewrapped, job.remaining, job.progress().failed) == (3, 2, 2)
    assert wrapper.calls[bytes([1]) * 32] == 2  # tried again in a second pass, not forever


# SQLite serialises writers: the interleavings below cannot happen there.
@pytest.mark.backend("postgresql")
def test_pg_retire_first_then_insert_is_refused(engine: Engine) -> None:
    """Retirement holds the row lock; the insert waits, then sees 'retired'."""
    KekManager(engine, FakeWrapper(FakeRing()), FakeRing()).sync()
    outcome: list[BaseException | None] = []
    with engine.connect() as retiring:
        retiring.begin()
        _mark_retired(retiring, 1)  # not committed yet

        def insert() -> None:
            try:
                SqlMetadataStore(engine).insert(_row("d" * 32, kek_version=1))
                outcome.append(None)
            except BaseException as e:  # noqa: BLE001
                outcome.append(e)

        thread = threading.Thread(target=insert)
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive(), "the insert must wait for the retirement"
        retiring.commit()
    thread.join(timeout=30)
    assert len(outcome) == 1
    assert isinstance(outcome[0], KekRetiredError)


@pytest.mark.backend("postgresql")
def test_pg_insert_first_then_retire_is_refused(engine: Engine) -> None:
    """An uncommitted insert holds a share lock; retirement waits, then counts it."""
    KekManager(engine, FakeWrapper(FakeRing()), FakeRing()).sync()
    outcome: list[BaseException | None] = []
    with engine.connect() as inserting:
        inserting.begin()
        _insert_guarded(inserting, _values(_row("e" * 32, kek_version=1)))

        def retire() -> None:
            try:
                with engine.begin() as connection:
                    _mark_retired(connection, 1)
                outcome.append(None)
            except BaseException as e:  # noqa: BLE001
                outcome.append(e)

        thread = threading.Thread(target=retire)
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive(), "the retirement must wait for the insert"
        inserting.commit()
    thread.join(timeout=30)
    assert len(outcome) == 1
    assert isinstance(outcome[0], KekInUseError)
