"""A client's deadline bounds the server's work for the call (docs/reliability.md, Deadlines).

The object store is stalled on purpose: the test's own ``weed`` is SIGSTOPped, so it
accepts connections and bytes but never answers, as a hung gateway or a partitioned
network would. Then, with a 1 s deadline each, a read of a large record (streamed from a
worker thread), a read of a small one (read whole in the pool) and a write are made at
once by one principal holding a share of exactly three calls. Checked, while the store
is still stalled:

- each call ends DEADLINE_EXCEEDED for its client, and is audited as ``failed`` with
  that status;
- the server's worker jobs (``medvault_worker_jobs``) are back to none within a few
  seconds, and no more of its threads wait on a socket than before the stall (the
  kernel's ``wchan``): no worker is left waiting on the store until its 30 s read
  timeout;
- the principal's call slots are free: three calls at once (its full share) succeed.

After SIGCONT: the write left no row; whatever object it left is unreferenced and
untagged, and a sweep removes it. Before the stall, a read whose client stops reading
mid-stream has its worker stop too.

PYTEST_DONT_REWRITE: failures name counts and codes only.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import records_pb2 as pb
from storage import S3BlobStore, SqlMetadataStore, sweep_orphans
from storage.sql_metadata import records
from tests.fixtures.databases import new_database
from tests.fixtures.seaweed import S3Server
from tests.fixtures.service import RunningService, free_port
from tests.integration.access.helpers import (
    TIMEOUT,
    Client,
    Metrics,
    client,
    engine_for,
    events,
    new_patient,
    wait_for,
)
from tests.integration.service.calls import server_bucket

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
# The witness bucket is on the store these tests stall: no checkpoint written to it, and
# the revocation markers read from it once, at start (their refresh, every 10 s by
# default, would otherwise leave one more thread waiting on the stalled store).
QUIET_WITNESS = {
    "checkpoint_seconds": 3600, "revocation_refresh_seconds": 3600,
    "revocation_stale_seconds": 3600,
}  # fmt: skip

TESTER = "deadline-tester"
SHARE = 3
CHUNK = 64 * 1024
DEADLINE = 1.0
# How long after the deadline the server may still be working for the calls: well under
# the S3 client's 30 s read timeout, which bounded it before.
SETTLE_SECONDS = 10.0


def _header(patient: pb.PatientId) -> pb.PutRecordRequest:
    head = pb.RecordHeader(
        patient=patient, kind=pb.RECORD_KIND_OTHER, content_type="application/octet-stream"
    )
    return pb.PutRecordRequest(header=head)


def _put(c: Client, patient: pb.PatientId, content: bytes, timeout: float = TIMEOUT) -> pb.Record:
    pieces = [content[i : i + CHUNK] for i in range(0, len(content), CHUNK)]
    stream = iter([_header(patient), *(pb.PutRecordRequest(chunk=p) for p in pieces)])
    record: pb.Record = c.records.PutRecord(stream, timeout=timeout)
    return record


def _read(c: Client, record_id: str, timeout: float = TIMEOUT) -> None:
    for _ in c.records.GetRecord(pb.GetRecordRequest(id=record_id), timeout=timeout):
        pass


def _list(c: Client, patient: pb.PatientId) -> None:
    c.records.ListRecords(pb.ListRecordsRequest(patient=patient), timeout=TIMEOUT)


def _code(run: Callable[[], Any]) -> str:
    try:
        run()
    except grpc.RpcError as e:
        return str(e.code().name)
    return "OK"


def _at_once(calls: list[Callable[[], Any]]) -> list[str]:
    """Each call's status code, the calls started together in threads."""
    codes = [""] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i: int) -> None:
        start.wait()
        codes[i] = _code(calls[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    return codes


# Where the kernel has a thread that waits on a socket (a read with a timeout polls).
_SOCKET_WAITS = ("poll_schedule_timeout", "sk_wait_data", "wait_woken")


def _socket_waiters(service: RunningService) -> int:
    """How many of the server's threads wait on a socket (for S3, in this test)."""
    tasks = Path(f"/proc/{service.process.pid}/task")
    count = 0
    for task in tasks.iterdir():
        try:
            where = (task / "wchan").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        count += where.startswith(_SOCKET_WAITS)
    return count


def _rows(engine: sa.Engine) -> set[str]:
    with engine.connect() as c:
        return set(c.execute(sa.select(records.c.object_key)).scalars())


class SlowReader:
    """Reads the first message of a stream, then stops reading past its deadline.

    Its channel keeps HTTP/2's initial 64 KiB window (no bandwidth probing), so the
    server cannot push the whole record into the transport's buffers and finish.
    """

    def __init__(self, service: RunningService, cert: tuple[Path, Path], record_id: str) -> None:
        self.code = ""
        creds = grpc.ssl_channel_credentials(
            root_certificates=service.tls.ca.read_bytes(),
            private_key=cert[1].read_bytes(), certificate_chain=cert[0].read_bytes(),
        )  # fmt: skip
        options = [("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 4 << 20)]
        self._channel = grpc.secure_channel(service.endpoint, creds, options=options)
        stub = Client("slow", self._channel).records
        self._replies = stub.GetRecord(pb.GetRecordRequest(id=record_id), timeout=DEADLINE)

    def run(self) -> None:
        try:
            next(self._replies)
            time.sleep(DEADLINE + 0.5)  # the client stops reading past its deadline
            for _ in self._replies:
                pass
        except grpc.RpcError as e:
            self.code = str(e.code().name)
        finally:
            self._channel.close()


@pytest.fixture
def stalled(own_s3: S3Server) -> Iterator[Callable[[bool], None]]:
    """``stall(True)`` SIGSTOPs the test's own weed, ``stall(False)`` resumes it."""
    pid = own_s3.server.pid
    assert pid is not None, "the test's weed is not running"

    def stall(on: bool) -> None:
        os.kill(pid, signal.SIGSTOP if on else signal.SIGCONT)

    try:
        yield stall
    finally:
        os.kill(pid, signal.SIGCONT)  # never leave it stopped: its own stop would hang


def test_a_deadline_stops_the_work_of_the_call(
    service_factory: Any,
    fresh_database: str,
    issue: Any,
    own_s3: S3Server,
    stalled: Callable[[bool], None],
) -> None:
    metrics_port = free_port()
    service: RunningService = service_factory(
        fresh_database, s3=own_s3, max_calls_per_principal=SHARE, chunk_size=CHUNK,
        metrics_listen=f"127.0.0.1:{metrics_port}", health_probe_seconds=3600,
        audit=QUIET_WITNESS,  # no witness write or marker read on the stalled store
    )  # fmt: skip
    metrics = Metrics(metrics_port)
    cert = issue(TESTER, "integration_tester")
    tester = client(service, cert)
    officer = client(service, issue("deadline-officer", "security_officer"))
    engine = engine_for(fresh_database)
    try:
        patient = new_patient()
        large = _put(tester, patient, os.urandom(2 << 20))
        small = _put(tester, patient, b"a short synthetic note")
        before = _rows(engine)
        # Committed objects are tagged in the background: not this test's subject, and a
        # tag request caught by the stall would wait out the S3 client's timeouts.
        blobs = S3BlobStore(own_s3.client(), server_bucket(service.config_path))
        wait_for(lambda: all(blobs.committed(key) for key in before), 10, "the tags")

        # Mid-stream, store healthy: the client stops reading; its worker stops too.
        reader = SlowReader(service, cert, large.id)
        reader.run()
        assert reader.code == "DEADLINE_EXCEEDED", reader.code
        wait_for(lambda: metrics.value("medvault_worker_jobs") == 0, SETTLE_SECONDS,
                 "the abandoned read's worker to stop")  # fmt: skip
        baseline = _socket_waiters(service)

        stalled(True)
        began = time.monotonic()
        codes = _at_once([
            lambda: _read(tester, large.id, DEADLINE),
            lambda: _read(tester, small.id, DEADLINE),
            lambda: _put(tester, new_patient(), b"synthetic, never stored", DEADLINE),
        ])  # fmt: skip
        assert codes == ["DEADLINE_EXCEEDED"] * 3, codes
        wait_for(lambda: metrics.value("medvault_worker_jobs") == 0, SETTLE_SECONDS,
                 "the server's workers to give up on the stalled store")  # fmt: skip
        settled = time.monotonic() - began
        # The gauge falls as each worker gives up; its thread may still be unwinding out of
        # the socket wait (CI, 5 workers on 2 cores: one more waiter, once). None may stay.
        waiting = [_socket_waiters(service)]

        def no_more_waiters() -> bool:
            waiting.append(_socket_waiters(service))
            return waiting[-1] <= baseline

        try:
            wait_for(no_more_waiters, SETTLE_SECONDS, "the threads on the stalled store")
        except AssertionError:
            pytest.fail(f"{waiting[-1]} threads wait on sockets, {baseline} before")
        # Its whole share, at once, while the store is still stalled.
        listed = _at_once([lambda: _list(tester, patient)] * SHARE)
        assert listed == ["OK"] * SHARE, listed
        stalled(False)

        assert _rows(engine) == before, "the write whose deadline passed stored a row"
        failed = events(officer, principal=TESTER, outcome=aupb.OUTCOME_FAILED)
        expired = [e for e in failed if e.status == "DEADLINE_EXCEEDED"]
        resources = sorted(e.resource for e in expired)
        want = sorted([f"record/{large.id}"] * 2 + [f"record/{small.id}", "record/new"])
        assert resources == want, resources  # the mid-stream read, then the three

        left = {b.key for b in blobs.list()} - before
        assert all(not blobs.committed(key) for key in left), "an abandoned object is tagged"
        sweep_orphans(blobs, SqlMetadataStore(engine), grace=timedelta(0))
        assert {b.key for b in blobs.list()} == before, "objects and rows differ after a sweep"
        print(f"\nworkers idle {settled:.1f} s after the calls began; {len(left)} orphan(s)")
    finally:
        tester.close()
        officer.close()
        engine.dispose()
        service.stop()


def test_a_cancelled_upload_keeps_its_upload_slot_until_its_worker_stops(
    service_factory: Any,
    issue: Any,
    own_s3: S3Server,
    stalled: Callable[[bool], None],
    tmp_path: Path,
) -> None:
    """Attack: ``server.max_uploads`` keeps upload threads to part of the pool, so reads
    always find one. An upload whose client cancels (no deadline: its S3 request keeps
    the store client's 30 s read timeout) used to give its upload slot back at once while
    its worker still waited on the store, so cancelled uploads could hold threads beyond
    the cap (each principal's call share still applied). The slot now stays taken until
    the worker stops, as the call slot does. SQLite only: the database plays no part.
    """
    service: RunningService = service_factory(
        f"sqlite:///{tmp_path / 'metadata.db'}", s3=own_s3, workers=2, max_uploads=1,
        max_calls_per_principal=2, chunk_size=CHUNK, health_probe_seconds=3600,
        audit=QUIET_WITNESS,  # no witness write or marker read on the stalled store
    )  # fmt: skip
    first = client(service, issue("upload-cancel-a", "integration_tester"))
    second = client(service, issue("upload-cancel-b", "integration_tester"))
    held = threading.Event()
    try:
        baseline = _socket_waiters(service)
        stalled(True)

        def stream() -> Iterator[pb.PutRecordRequest]:
            yield _header(new_patient())
            for _ in range((9 << 20) // CHUNK):  # over one 8 MiB part: a request is sent
                yield pb.PutRecordRequest(chunk=os.urandom(CHUNK))
            held.wait(TIMEOUT)  # the client neither ends nor cancels yet

        upload = first.records.PutRecord.future(stream(), timeout=None)
        wait_for(lambda: _socket_waiters(service) > baseline, 20, "the upload's S3 request")
        upload.cancel()
        held.set()
        # Its worker still waits on the stalled store: the one upload slot is still taken.
        code = _code(lambda: _put(second, new_patient(), b"synthetic, never stored", 5))
        assert code == "RESOURCE_EXHAUSTED", code
        stalled(False)
        wait_for(lambda: _code(lambda: _put(second, new_patient(), b"synthetic")) == "OK",
                 TIMEOUT, "the slot back once the cancelled upload's worker stopped")  # fmt: skip
    finally:
        held.set()
        first.close()
        second.close()
        service.stop()


@pytest.fixture
def postgres_only(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    yield from new_database(request, "postgresql://", tmp_path_factory)


def _log_has(service: RunningService, message: str, **fields: str) -> bool:
    for line in service.log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") == message and all(entry.get(k) == v for k, v in fields.items()):
            return True
    return False


def _lock_waiters(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        waiting = connection.scalar(sa.text(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        ))  # fmt: skip
        return int(waiting or 0)


def test_a_refusal_is_audited_even_if_its_client_cancels_while_the_pool_is_busy(
    service_factory: Any, issue: Any, postgres_only: str
) -> None:
    """Attack: leave an allowed call's refusal (here INVALID_ARGUMENT, expected_sha256)
    out of the trail. The failure's audit event is written from a pool thread; when every
    thread is busy its job waits in the queue, and the caller who cancels then (or whose
    deadline passes) cancelled that queued job: no event. The database is only the tool
    that keeps the pool busy (a table lock), so PostgreSQL only.
    """
    metrics_port = free_port()
    service: RunningService = service_factory(
        postgres_only, workers=1, max_calls_per_principal=2, chunk_size=CHUNK,
        metrics_listen=f"127.0.0.1:{metrics_port}", health_probe_seconds=3600,
        audit=QUIET_WITNESS,
    )  # fmt: skip
    metrics = Metrics(metrics_port)
    busy = client(service, issue("refusal-pool-filler", "integration_tester"))
    caller = client(service, issue("refusal-canceller", "integration_tester"))
    officer = client(service, issue("refusal-officer", "security_officer"))
    engine = engine_for(postgres_only)
    send = threading.Event()
    try:
        stored = _put(busy, new_patient(), b"synthetic note")
        head = _header(new_patient())
        head.header.expected_sha256 = b"\0" * 32  # not the content's: refused at its end

        def stream() -> Iterator[pb.PutRecordRequest]:
            yield head
            # A full chunk: the handler reads a stream ahead only up to one chunk
            # (SyncRequests.prefill), then hands it to a worker.
            yield pb.PutRecordRequest(chunk=b"s" * CHUNK)
            send.wait(TIMEOUT)
            yield pb.PutRecordRequest(chunk=b"synthetic content")

        upload = caller.records.PutRecord.future(stream(), timeout=TIMEOUT)
        # Its worker (one of the pool's two threads) waits for the rest of the content.
        wait_for(lambda: metrics.value("medvault_worker_jobs") == 1, 20, "the upload's worker")
        with engine.connect() as lock:
            lock.execute(sa.text(f"LOCK TABLE {records.name} IN ACCESS EXCLUSIVE MODE"))
            stats = [
                threading.Thread(target=_code, args=(lambda: busy.records.StatRecord(
                    pb.StatRecordRequest(id=stored.id), timeout=TIMEOUT),))
                for _ in range(2)
            ]  # fmt: skip
            for t in stats:
                t.start()
            # One stat waits on the lock in the other thread, one waits in the queue.
            wait_for(lambda: metrics.value("medvault_worker_jobs") == 3, 20, "a full pool")
            wait_for(lambda: _lock_waiters(engine) == 1, 20, "a stat waiting on the lock")
            send.set()  # the upload ends, refused; its audit job queues behind the stat
            wait_for(lambda: _log_has(service, "rpc failed", rpc="PutRecord",
                                      code="INVALID_ARGUMENT"), 20, "the refusal")  # fmt: skip
            upload.cancel()
            lock.rollback()
        for t in stats:
            t.join(TIMEOUT)
        wait_for(lambda: metrics.value("medvault_worker_jobs") == 0, 20, "an idle pool")
        failed = events(officer, principal="refusal-canceller", outcome=aupb.OUTCOME_FAILED)
        assert [e.status for e in failed] == ["INVALID_ARGUMENT"], [e.status for e in failed]
    finally:
        send.set()
        for c in (busy, caller, officer):
            c.close()
        engine.dispose()
        service.stop()
