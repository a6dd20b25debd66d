# ruff: noqa: F811  (the fixtures of test_audit_log are imported, then requested by name)
"""The audit writer on SQLite and PostgreSQL: isolation of a bad event, outages, state
changes committed with their events, several events queued as one item (SignRecord's
read and signature: one transaction, all or none, retried as a unit, ``MAX_BATCH``
counted in events), and no busy loop once another process signed.

Batches are handed to the writer directly (``_write``) so that which events share a
transaction is certain, not left to thread timing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from keystore.signing import Pkcs11Signer
from service.audit import AuditUnavailableError
from service.audit.checkpoints import make_checkpoint
from service.audit.trail import MAX_BATCH, AuditTrail, _Item
from storage.audit_log import Appended, Pending, SqlAuditLog
from storage.audit_model import AuditEntry, AuditFilter
from storage.errors import BackendUnavailableError, DatabaseUnreachableError, RecordConflictError
from storage.sql_metadata import make_engine
from tests.fixtures.service import free_port
from tests.integration.storage.test_audit_log import (  # noqa: F401  (fixtures)
    audit_engine,
    audit_log,
    audit_url,
    entry,
    signer,
    verify,
)

pytestmark = pytest.mark.integration

scratch = sa.Table("trail_scratch", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))


@pytest.fixture
def trail(audit_log: SqlAuditLog) -> Iterator[AuditTrail]:
    with AuditTrail(audit_log, None) as t:
        yield t


@pytest.fixture
def scratch_table(audit_engine: Engine) -> Engine:
    scratch.create(audit_engine)
    return audit_engine


def _ids(engine: Engine) -> list[int]:
    with engine.connect() as c:
        return sorted(c.scalars(sa.select(scratch.c.id)))


def _insert(n: int) -> Callable[[Connection], int]:
    def change(connection: Connection) -> int:
        try:
            connection.execute(scratch.insert().values(id=n))
        except sa.exc.IntegrityError as e:
            raise RecordConflictError("exists") from e
        return n

    return change


def _raw(bad: AuditEntry) -> _Item:
    """An item that skipped normalisation (a caller bypassing ``record``)."""
    return _Item((Pending(bad),))


def test_refused_batch_fails_only_the_bad_events(
    trail: AuditTrail, audit_log: SqlAuditLog, signer: Pkcs11Signer
) -> None:
    good = [_Item((Pending(entry(n)),)) for n in range(20)]
    bad = [_raw(entry(90, resource="r" * 300)), _raw(entry(91, principal="p\x00" * 200))]
    batch = good[:7] + bad[:1] + good[7:15] + bad[1:] + good[15:]
    trail._write(batch)
    for item in good:
        assert item.future.result(timeout=5)[0].sequence > 0
    for item in bad:
        with pytest.raises(AuditUnavailableError):
            item.future.result(timeout=5)
    assert audit_log.head()[0] == 20
    assert verify(audit_log, signer)[0] is None


def test_outage_fails_the_batch_at_once(trail: AuditTrail, audit_log: SqlAuditLog) -> None:
    calls = 0

    def down(items: object) -> object:
        nonlocal calls
        calls += 1
        raise BackendUnavailableError(DOWN)

    audit_log.append_pending = down  # type: ignore[method-assign]
    batch = [_Item((Pending(entry(n)),)) for n in range(300)]
    trail._write(batch)
    assert calls == 1, "an outage must not be retried event by event"
    errors = [i.future.exception(timeout=1) for i in batch]
    assert all(isinstance(e, AuditUnavailableError) for e in errors)
    # The caller learns what is down (storage's message names no row data).
    assert {str(e) for e in errors} == {f"audit trail unavailable: {DOWN}"}


DOWN = "audit database unavailable at db.example:5432 (OperationalError); retry later"


def test_changes_commit_with_their_events_or_not_at_all(
    trail: AuditTrail, audit_log: SqlAuditLog, scratch_table: Engine, signer: Pkcs11Signer
) -> None:
    with scratch_table.begin() as c:
        c.execute(scratch.insert().values(id=2))  # change 2 will conflict
    items = [_Item((Pending(entry(n), _insert(n)),)) for n in range(5)]
    reads = [_Item((Pending(entry(10 + n)),)) for n in range(3)]
    trail._write(items[:2] + reads + items[2:])
    assert [i.future.result(timeout=5)[1] for i in items if i is not items[2]] == [0, 1, 3, 4]
    with pytest.raises(RecordConflictError):
        items[2].future.result(timeout=5)  # the change's own error, to its caller only
    assert all(r.future.result(timeout=5) for r in reads)
    assert _ids(scratch_table) == [0, 1, 2, 3, 4]
    assert audit_log.head()[0] == 7, "an event was written for the refused change"
    # An event that cannot be written takes its change with it.
    bad = _Item((Pending(entry(20, resource="r" * 300), _insert(20)),))
    trail._write([bad, _Item((Pending(entry(21), _insert(21)),))])
    with pytest.raises(AuditUnavailableError):
        bad.future.result(timeout=5)
    assert _ids(scratch_table) == [0, 1, 2, 3, 4, 21]
    assert verify(audit_log, signer)[0] is None


def test_record_change_returns_the_result_through_the_queue(
    trail: AuditTrail, scratch_table: Engine
) -> None:
    results: list[int] = []

    def one(n: int) -> None:
        results.append(trail.record_change(entry(n), _insert(n)))

    threads = [threading.Thread(target=one, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(40))
    assert _ids(scratch_table) == list(range(40))


class _CountingLog(SqlAuditLog):
    heads = 0

    def head(self) -> tuple[int, bytes]:
        self.heads += 1
        return super().head()


class _SignedElsewhereFirst(_CountingLog):
    """The writer's checkpoint looks at the head only once the test has signed it, as
    another replica would have: on a loaded machine the writer's own period (timed from
    the trail's start) could otherwise pass before the test signs, and the setup fail."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.signed = threading.Event()

    def head(self) -> tuple[int, bytes]:
        if threading.current_thread() is not threading.main_thread():  # the writer
            assert self.signed.wait(30), "the test never signed the head"
        return super().head()


def test_idle_writer_sleeps_once_another_process_signed(
    audit_engine: Engine, signer: Pkcs11Signer
) -> None:
    """Issue 10: the head is already checkpointed elsewhere, the writer must not spin."""
    log = _SignedElsewhereFirst(audit_engine)
    with AuditTrail(log, signer, checkpoint_seconds=0.3) as trail:
        trail.record(entry(1))
        sequence, head_hash = log.head()  # another replica (or the CLI) signs first
        assert log.add_checkpoint(make_checkpoint(signer, sequence, head_hash, datetime.now(UTC)))
        log.heads = 0
        log.signed.set()
        # Once its period is due the writer looks at the head, finds it signed and has
        # nothing left to sign; how soon depends on the machine's load, so wait for it
        # rather than for a fixed time. Then it must sleep: a spin reads ~100 times in 0.8 s.
        _wait_until(lambda: trail._unsigned == 0, "the writer to look at the signed head")
        threading.Event().wait(0.8)  # idle
        assert log.heads <= 2, f"writer busy-looped: {log.heads} head reads in 0.8 s"
        assert trail._unsigned == 0
        trail.record(replace(entry(2)))
        # A new event is signed once (a checkpoint reads the head a few times), then the
        # writer sleeps again: a spinning writer reads it ~100 times in the idle window.
        _wait_until(lambda: trail._unsigned == 0, "the writer to sign the new event")
        threading.Event().wait(0.8)  # idle
        assert log.heads <= 8, f"writer busy-looped after a new event: {log.heads} head reads"


def _wait_until(done: Callable[[], bool], what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        threading.Event().wait(0.01)


def _writer_held_in_a_batch(
    trail: AuditTrail,
) -> tuple[threading.Thread, threading.Event, threading.Event]:
    """Record change 1 in a thread whose change holds the writer inside its batch until
    ``release`` is set; ``inside`` is set once the batch runs."""
    release, inside = threading.Event(), threading.Event()

    def slow(connection: Connection) -> int:
        inside.set()
        release.wait(10)  # holds the writer inside a batch
        return _insert(1)(connection)

    first = threading.Thread(target=trail.record_change, args=(entry(1), slow))
    first.start()
    return first, inside, release


def test_a_change_whose_caller_gave_up_is_never_written(
    trail: AuditTrail, scratch_table: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put deletes its object when the trail times out: its row must not come later."""
    monkeypatch.setattr("service.audit.trail.RECORD_TIMEOUT_SECONDS", 0.2)
    first, inside, release = _writer_held_in_a_batch(trail)
    # Queue the second only once the first's batch is running: drained into the same
    # batch it would be "already running" and (rightly) waited for, not cancelled.
    assert inside.wait(10), "the writer never ran the first change"
    with pytest.raises(AuditUnavailableError):
        trail.record_change(entry(2), _insert(2))  # queued behind it; times out
    release.set()
    first.join()
    assert trail.record_change(entry(3), _insert(3)) == 3
    assert _ids(scratch_table) == [1, 3]


def test_an_unreachable_database_is_named_by_host_and_port() -> None:
    port = free_port()  # nothing listens there
    engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/absent")
    try:
        with pytest.raises(DatabaseUnreachableError, match=f"at 127.0.0.1:{port} "):
            SqlAuditLog(engine).append([entry(1)])
    finally:
        engine.dispose()


def test_a_receipt_refused_once_is_refused_again_the_same_way(
    trail: AuditTrail, scratch_table: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SignRecord (CAdES) waits for its read event twice: before storing the signature,
    and again on the way out. An event that timed out (cancelled, never written) must be
    refused the second time as the first (UNAVAILABLE), not as a bare cancellation."""
    monkeypatch.setattr("service.audit.trail.RECORD_TIMEOUT_SECONDS", 0.2)
    first, inside, release = _writer_held_in_a_batch(trail)
    try:
        assert inside.wait(10), "the writer never ran the first change"
        receipt = trail.submit(entry(2))  # queued behind it; times out, cancelled
        for _ in range(2):
            with pytest.raises(AuditUnavailableError):
                receipt.wait()
    finally:
        release.set()
        first.join()


class _CountingAppends(SqlAuditLog):
    """The real log, counting its append transactions."""

    appends = 0

    def append_pending(self, items: Sequence[Pending]) -> list[Appended]:
        self.appends += 1
        return super().append_pending(items)


def _sequences(log: SqlAuditLog) -> dict[str, int]:
    return {e.entry.resource: e.sequence for e in log.query(AuditFilter())}


def _signing(trail: AuditTrail, n: int) -> int:
    """SignRecord's shape: the read event, then the signature's event with its change."""
    before = [entry(n, resource=f"read-{n}")]
    return trail.record_change(entry(n, resource=f"signature-{n}"), _insert(n), before=before)


def test_an_item_commits_its_events_in_one_transaction_consecutively(
    scratch_table: Engine, signer: Pkcs11Signer
) -> None:
    log = _CountingAppends(scratch_table)
    with AuditTrail(log, signer, checkpoint_every=1000) as trail:
        assert _signing(trail, 1) == 1
        assert log.appends == 1, "the read and the signature took separate transactions"
        assert trail._unsigned == 2, "each event of an item counts towards the checkpoint"
        # Concurrent items and lone events: each item's events stay adjacent.
        threads = [threading.Thread(target=_signing, args=(trail, n)) for n in range(10, 30)]
        threads += [threading.Thread(target=trail.record, args=(entry(n),)) for n in range(40, 60)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seqs = _sequences(log)
        assert (seqs["read-1"], seqs["signature-1"]) == (1, 2)
        assert all(seqs[f"signature-{n}"] == seqs[f"read-{n}"] + 1 for n in range(10, 30))
        assert _ids(scratch_table) == [1, *range(10, 30)]
        assert log.head()[0] == 62
        assert trail.checkpoint_now() is not None  # the checkpointer accepts the head
        assert trail.verify().ok


def test_the_events_before_a_failed_change_are_written_and_its_error_raised(
    trail: AuditTrail, audit_log: SqlAuditLog, scratch_table: Engine
) -> None:
    """A signature whose row conflicts: the read stays recorded, the caller gets the error."""
    with scratch_table.begin() as c:
        c.execute(scratch.insert().values(id=5))
    with pytest.raises(RecordConflictError):
        _signing(trail, 5)
    assert _sequences(audit_log) == {"read-5": 1}
    assert _ids(scratch_table) == [5]
    assert trail.verify().ok


def test_an_item_is_refused_whole_and_alone_and_retried_as_a_unit(
    scratch_table: Engine,
) -> None:
    """A bad event (one that skipped normalisation) fails its item's events and change,
    and no one else's; each item of the refused batch is retried in one transaction."""
    log = _CountingAppends(scratch_table)
    trail = AuditTrail(log, None)
    try:
        good = [_Item((Pending(entry(n, resource=f"lone-{n}")),)) for n in range(3)]
        bad = _Item((
            Pending(entry(10, resource="r" * 300)),  # too wide for its column
            Pending(entry(11, resource="signature-11"), _insert(11)),
        ))  # fmt: skip
        pair = _Item((
            Pending(entry(20, resource="read-20")),
            Pending(entry(21, resource="signature-20"), _insert(20)),
        ))  # fmt: skip
        trail._write([good[0], bad, good[1], pair, good[2]])
        assert log.appends == 1 + 5, "one batch, then one transaction per item"
        with pytest.raises(AuditUnavailableError):
            bad.future.result(timeout=5)
        assert pair.future.result(timeout=5)[1] == 20
        assert all(g.future.result(timeout=5)[0].sequence > 0 for g in good)
        seqs = _sequences(log)
        assert sorted(seqs) == ["lone-0", "lone-1", "lone-2", "read-20", "signature-20"]
        assert seqs["signature-20"] == seqs["read-20"] + 1
        assert _ids(scratch_table) == [20]
        # Alone in its batch, a refused item writes none of its events either.
        lone = _Item((
            Pending(entry(30, resource="read-30")),
            Pending(entry(31, principal="p\x00" * 200), _insert(30)),
        ))  # fmt: skip
        trail._write([lone])
        with pytest.raises(AuditUnavailableError):
            lone.future.result(timeout=5)
        assert log.head()[0] == 5
        assert _ids(scratch_table) == [20]
        assert trail.verify().ok
    finally:
        trail.close()


def test_max_batch_counts_events_and_never_splits_an_item(audit_log: SqlAuditLog) -> None:
    trail = AuditTrail(audit_log, None)
    trail.close()  # no writer thread: the batches are drained here
    singles = [_Item((Pending(entry(n)),)) for n in range(MAX_BATCH)]
    pair = _Item((Pending(entry(1)), Pending(entry(2))))
    for item in [*singles[1:-1], pair, singles[-1]]:
        trail._queue.put(item)
    batch, stop = trail._drain(singles[0])
    assert (len(batch), stop) == (MAX_BATCH - 1, False), "the pair would pass MAX_BATCH"
    batch, _ = trail._drain(trail._next())
    assert batch == [pair, singles[-1]]


def test_an_item_with_auditing_disabled_writes_nothing_and_runs_the_change(
    audit_log: SqlAuditLog, scratch_table: Engine
) -> None:
    """The benchmark-only switch."""
    trail = AuditTrail(audit_log, None, enabled=False)
    assert _signing(trail, 2) == 2
    assert audit_log.head()[0] == 0
    assert _ids(scratch_table) == [2]
