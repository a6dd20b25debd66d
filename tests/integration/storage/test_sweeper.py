"""Attack: a database writer makes a row edit permanent through the orphan sweeper.

Issue 8 ("nothing lost"). Deleting a record's row, or re-pointing its ``object_key``,
left the record's object unreferenced, and the sweep deleted it once it was older than
the grace period (counted from the upload, long past for an existing record): restoring
the database no longer brought the record back. A committed record's object is now
tagged after the row commits, and the sweep never deletes a tagged object; it reports
it (the service raises a ``row-tampered`` incident). Real SeaweedFS, SoftHSM2 and
database; the sweep's clock is injected (``now``) instead of waiting out the grace.

PYTEST_DONT_REWRITE: failures name counts and flags only.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from keystore import Pkcs11BlindIndexer, Pkcs11KeyWrapper, Pkcs11SessionPool
from storage.commit_tags import CommitTagger
from storage.errors import BackendUnavailableError, DatabaseUnreachableError
from storage.model import NewRecord, PatientRef, RecordKind
from storage.records import RecordStore
from storage.s3_blobs import MIB, S3BlobStore
from storage.sql_metadata import SqlMetadataStore, records
from storage.sweeper import sweep_orphans
from tests.fixtures.seaweed import S3Bucket

pytestmark = pytest.mark.integration
GRACE = timedelta(minutes=5)
CONTENT = b"synthetic sweeper note " * 20


def _later() -> datetime:
    """A sweep's clock well past the grace of anything uploaded so far."""
    return datetime.now(UTC) + 2 * GRACE


class _World:
    def __init__(self, engine: Engine, bucket: S3Bucket, pool: Pkcs11SessionPool) -> None:
        self.engine, self.bucket = engine, bucket
        self.metadata = SqlMetadataStore(engine)
        self.store = RecordStore(
            bucket.store, self.metadata, Pkcs11KeyWrapper(pool), Pkcs11BlindIndexer(pool)
        )
        self.missing: list[str] = []

    def put(self, store: RecordStore | None = None) -> tuple[str, str]:
        """A new record: its id and object key."""
        header = NewRecord(PatientRef(f"SYNTH{secrets.token_hex(6)}", "urn:oid:2.999.1"),
                           RecordKind.OTHER, "application/octet-stream", title="synthetic")
        info = (store or self.store).put(header, [CONTENT], "test-app")
        return info.id, self.object_key(info.id)

    def orphan(self) -> str:
        """The object of a write whose process died between upload and commit."""

        def crash() -> None:
            raise KeyboardInterrupt

        before = self.objects()
        crashing = RecordStore(
            _NoDelete(self.bucket), self.metadata, self.store._wrapper, self.store._indexer,
            before_commit=crash,
        )  # a dead process cleans nothing up: no delete
        with pytest.raises(KeyboardInterrupt):
            self.put(crashing)
        (orphan,) = self.objects() - before
        return orphan

    def object_key(self, record_id: str) -> str:
        with self.engine.connect() as c:
            query = sa.select(records.c.object_key).where(records.c.id == record_id)
            return str(c.execute(query).scalar_one())

    def edit(self, record_id: str, **values: object) -> None:
        with self.engine.begin() as c:
            c.execute(records.update().where(records.c.id == record_id).values(**values))

    def delete_row(self, record_id: str) -> None:
        with self.engine.begin() as c:
            c.execute(records.delete().where(records.c.id == record_id))

    def objects(self) -> set[str]:
        return {b.key for b in self.bucket.store.list()}

    def sweep(self, now: datetime | None = None, backfill: timedelta | None = None) -> object:
        return sweep_orphans(self.bucket.store, self.metadata, GRACE, now or _later(),
                             backfill=backfill, on_missing_row=self.missing.append)


@pytest.fixture
def world(
    metadata_engine: Engine, s3_bucket: S3Bucket, keystore_pool: Pkcs11SessionPool
) -> _World:
    return _World(metadata_engine, s3_bucket, keystore_pool)


def test_a_stored_record_is_tagged_committed(world: _World) -> None:
    _, key = world.put()
    assert world.bucket.store.committed(key), "the write path did not tag its object"


def test_a_deleted_row_does_not_take_the_object(world: _World) -> None:
    record_id, key = world.put()
    world.delete_row(record_id)
    for _ in range(2):  # every sweep keeps it and reports it again
        result = world.sweep()
        assert result == type(result)(1, 0, 0, 1), f"sweep result {result}"
    assert key in world.objects(), "the sweep deleted a committed record's object"
    assert world.missing == [key, key]


def test_a_repointed_row_does_not_take_the_object(world: _World) -> None:
    record_id, key = world.put()
    world.edit(record_id, object_key="objects/x")
    world.sweep()
    assert key in world.objects(), "the sweep deleted a committed record's object"
    assert world.missing == [key]


def test_swapped_object_keys_delete_nothing(world: _World) -> None:
    first, first_key = world.put()
    second, second_key = world.put()
    world.edit(first, object_key="objects/swap")  # object_key is unique: via a third
    world.edit(second, object_key=first_key)
    world.edit(first, object_key=second_key)
    assert world.sweep().removed == 0
    assert {first_key, second_key} <= world.objects()
    assert world.missing == []


def test_a_row_repointed_to_an_orphan_keeps_both(world: _World) -> None:
    """The orphan becomes referenced and is tagged (the writer pinned garbage); the
    record's object, now without a row, is kept and reported. Once the row is restored
    the orphan is the one reported: kept, for an operator to remove."""
    orphan = world.orphan()
    record_id, key = world.put()
    world.edit(record_id, object_key=orphan)
    result = world.sweep()
    assert (result.removed, result.tagged, result.missing_rows) == (0, 1, 1), f"{result}"
    assert {key, orphan} <= world.objects()
    assert world.missing == [key]
    world.edit(record_id, object_key=key)  # the operator restores the row
    world.sweep()
    assert world.missing == [key, orphan]
    assert {key, orphan} <= world.objects()


def test_an_interrupted_write_is_still_swept(world: _World) -> None:
    orphan = world.orphan()
    assert world.objects() == {orphan}
    assert not world.bucket.store.committed(orphan)
    world.sweep(now=datetime.now(UTC))  # within the grace: an upload may be in flight
    assert world.objects() == {orphan}
    result = world.sweep()
    assert (result.removed, result.missing_rows) == (1, 0), f"sweep result {result}"
    assert world.objects() == set()
    assert world.missing == []


def test_the_sweep_tags_referenced_untagged_objects(world: _World) -> None:
    record_id, key = world.put()
    world.bucket.client.delete_object_tags(world.bucket.name, key)  # e.g. stored pre-upgrade
    # Older than a limited backfill: not looked at.
    assert world.sweep(backfill=GRACE).tagged == 0
    assert world.sweep(now=datetime.now(UTC), backfill=GRACE).tagged == 1
    assert world.bucket.store.committed(key)
    world.bucket.client.delete_object_tags(world.bucket.name, key)
    assert world.sweep().tagged == 1, "a full backfill skipped an object"
    world.delete_row(record_id)  # the row is gone later: the object is protected now
    world.sweep()
    assert key in world.objects()
    assert world.missing == [key]


def test_a_failed_tag_does_not_fail_the_put(world: _World, s3_bucket: S3Bucket) -> None:
    world.store._blobs = _NoTag(s3_bucket)
    record_id, key = world.put()
    assert world.store.stat(record_id).id == record_id
    assert not world.bucket.store.committed(key)
    assert world.sweep(now=datetime.now(UTC)).tagged == 1  # the retry
    assert world.bucket.store.committed(key)


class _NoDelete(S3BlobStore):
    """The bucket, as seen by a process that dies before it can delete anything."""

    def __init__(self, bucket: S3Bucket) -> None:
        super().__init__(bucket.client, bucket.name, part_size=5 * MIB)

    def delete(self, key: str) -> None:
        pass


class _NoTag(S3BlobStore):
    """The bucket with a tagging request that fails (an S3 outage just after commit)."""

    def __init__(self, bucket: S3Bucket) -> None:
        super().__init__(bucket.client, bucket.name, part_size=5 * MIB)

    def mark_committed(self, key: str) -> None:
        raise BackendUnavailableError("object store unreachable: tag object failed")


def test_an_error_after_the_commit_keeps_the_object(world: _World) -> None:
    """A commit whose outcome the caller never learns (the connection lost during COMMIT)
    must not cost the record its content: the row committed, so the object stays."""

    def committed_then_lost(_ref: object, insert: Callable[[Connection], None]) -> None:
        with world.engine.begin() as connection:
            insert(connection)
        raise ConnectionError("connection lost during COMMIT")

    before = world.objects()
    header = NewRecord(PatientRef(f"SYNTH{secrets.token_hex(6)}", "urn:oid:2.999.1"),
                       RecordKind.OTHER, "application/octet-stream", title="synthetic")
    with pytest.raises(ConnectionError):
        world.store.put(header, [CONTENT], "test-app", on_commit=committed_then_lost)
    (key,) = world.objects() - before  # the committed record's object was not deleted
    with world.engine.connect() as c:
        rows = c.execute(sa.select(records.c.id).where(records.c.object_key == key)).all()
    assert len(rows) == 1, "no row references the object"
    assert world.bucket.store.committed(key), "the committed object was not tagged"


def test_an_error_before_the_commit_removes_the_object(world: _World) -> None:
    def refused(_ref: object, _insert: Callable[[Connection], None]) -> None:
        raise ConnectionError("audit trail unavailable")

    before = world.objects()
    header = NewRecord(PatientRef(f"SYNTH{secrets.token_hex(6)}", "urn:oid:2.999.1"),
                       RecordKind.OTHER, "application/octet-stream", title="synthetic")
    with pytest.raises(ConnectionError):
        world.store.put(header, [CONTENT], "test-app", on_commit=refused)
    assert world.objects() == before, "a refused write left its object behind"


class _DownForLookups:
    """The metadata store with its lookups failing, as while the database is down."""

    def __init__(self, inner: SqlMetadataStore) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def get(self, *_args: object, **_kwargs: object) -> object:
        raise BackendUnavailableError("metadata database unavailable at db:5432; retry later")


def _put_failing(world: _World, cause: Exception) -> set[str]:
    """A put whose commit fails as the audit trail reports ``cause``; the new objects."""

    def failing(_ref: object, _insert: Callable[[Connection], None]) -> None:
        raise ConnectionError("audit trail unavailable") from cause

    store = RecordStore(
        world.bucket.store, _DownForLookups(world.metadata),  # type: ignore[arg-type]
        world.store._wrapper, world.store._indexer,
    )  # fmt: skip
    before = world.objects()
    header = NewRecord(PatientRef(f"SYNTH{secrets.token_hex(6)}", "urn:oid:2.999.1"),
                       RecordKind.OTHER, "application/octet-stream", title="synthetic")
    with pytest.raises(ConnectionError):
        store.put(header, [CONTENT], "test-app", on_commit=failing)
    return world.objects() - before


def test_a_commit_that_never_reached_the_database_removes_its_object(world: _World) -> None:
    """While the database is down the row cannot be looked up, but a commit that could
    not even connect committed nothing: its object goes at once, not after the grace."""
    unreachable = DatabaseUnreachableError("audit database unavailable at db:5432; retry later")
    assert _put_failing(world, unreachable) == set(), "an unsent write left its object"


def test_a_commit_lost_midway_while_the_database_is_down_keeps_the_object(
    world: _World,
) -> None:
    """A connection lost during the transaction may have committed it, and the row cannot
    be looked up: the object stays for the sweeper."""
    lost = BackendUnavailableError("audit database unavailable at db:5432; retry later")
    assert len(_put_failing(world, lost)) == 1, "an in-doubt write's object was deleted"


def test_a_bucket_writer_cannot_flood_incidents_with_tagged_garbage(
    world: _World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bucket writer can upload objects already tagged committed: they are kept (a tag
    is all the sweeper has), but one sweep reports at most ``MAX_REPORTED`` of them as
    incidents; the rest are counted (each report is an audit event and an alert)."""
    monkeypatch.setattr("storage.sweeper.MAX_REPORTED", 2)
    garbage = [f"objects/{secrets.token_hex(16)}" for _ in range(5)]
    for key in garbage:
        world.bucket.store.put(key, iter([b"junk"]))
        world.bucket.store.mark_committed(key)
    result = world.sweep()
    assert (result.removed, result.missing_rows) == (0, 5), f"{result}"
    assert len(world.missing) == 2, f"{len(world.missing)} incidents"
    assert set(garbage) <= world.objects()


def test_background_tagging_tags_after_the_reply_and_a_lost_tag_is_swept_in(
    world: _World,
) -> None:
    """With the service's tagger the put returns before its tag; the tag follows, and a
    tag lost with the process (the tagger never ran) is set by the next sweep."""
    tagger = CommitTagger(world.bucket.store.mark_committed)
    store = RecordStore(
        world.bucket.store, world.metadata, world.store._wrapper, world.store._indexer,
        tagger=tagger,
    )  # fmt: skip
    _, key = world.put(store)
    tagger.join()
    assert world.bucket.store.committed(key), "the background tagger did not tag"

    lost = CommitTagger(lambda _key: None)  # a process killed before its tags ran
    crashed = RecordStore(
        world.bucket.store, world.metadata, world.store._wrapper, world.store._indexer,
        tagger=lost,
    )  # fmt: skip
    _, untagged = world.put(crashed)
    lost.join()
    assert not world.bucket.store.committed(untagged)
    assert world.sweep(now=datetime.now(UTC)).tagged >= 1
    assert world.bucket.store.committed(untagged), "the sweep did not tag a committed object"
    tagger.close()
    lost.close()
