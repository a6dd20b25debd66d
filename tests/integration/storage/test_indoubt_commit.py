"""Attack: a put whose COMMIT reached PostgreSQL but whose reply was lost.

The classic in-doubt commit: the row and its audit event are committed, the client sees
its connection die. If the write path took that for "nothing stored" it would delete
the object, leaving a visible record whose content is gone (data loss). Real
PostgreSQL (a database of its own), SeaweedFS, SoftHSM2, the real audit trail; between
the service and the database a TCP proxy of this test forwards the COMMIT and drops the
server's reply, then closes both ends, as a postmaster killed at that instant or a
network cut would. Two cases: the database answers again at once (the write path looks
the row up: found, the object is kept and tagged), or it stays unreachable while the
write path asks (outcome unknown: the object is left for the sweeper, which keeps it
once the row can be seen). Either way the record reads back intact afterwards.

PYTEST_DONT_REWRITE: failures name counts and flags only.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from keystore import Pkcs11BlindIndexer, Pkcs11KeyWrapper, Pkcs11SessionPool
from service.audit import AuditUnavailableError
from service.audit.trail import AuditTrail
from storage.audit_log import SqlAuditLog
from storage.audit_model import AuditEntry
from storage.model import NewRecord, PatientRef, RecordKind
from storage.records import RecordRef, RecordStore
from storage.sql_metadata import SqlMetadataStore, make_engine, records, upgrade
from tests.fixtures.databases import new_database
from tests.fixtures.seaweed import S3Bucket

pytestmark = pytest.mark.integration

CONTENT = b"synthetic in-doubt note " * 40


class CommitReplyDropper:
    """A TCP proxy to PostgreSQL that, once armed, loses the reply to one COMMIT.

    The COMMIT is forwarded (the server commits), the server's answer is discarded and
    both sockets are closed. With ``stay_down`` new connections are then refused (closed
    at once) until :meth:`restore`.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._armed = threading.Event()
        self._down = threading.Event()
        self.dropped = threading.Event()
        self._stay_down = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, *, stay_down: bool) -> None:
        self._stay_down = stay_down
        self._armed.set()

    def restore(self) -> None:
        self._down.clear()

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._down.is_set():
                client.close()
                continue
            server = socket.create_connection(self._upstream)
            with self._lock:
                self._sockets += [client, server]
            lost = threading.Event()  # this connection's COMMIT reply is to be lost
            threading.Thread(target=self._up, args=(client, server, lost), daemon=True).start()
            threading.Thread(target=self._back, args=(server, client, lost), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, lost: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if b"COMMIT" in data and self._armed.is_set():
                    self._armed.clear()
                    lost.set()  # before the server can answer
                server.sendall(data)
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_WR)

    def _back(self, server: socket.socket, client: socket.socket, lost: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if lost.is_set():  # the COMMIT's answer: never delivered
                    if self._stay_down:
                        self._down.set()
                    # Before the sockets close: the write path sees the cut at once and
                    # may fail (stay_down) before this thread would run again.
                    self.dropped.set()
                    for s in (client, server):
                        with contextlib.suppress(OSError):
                            s.shutdown(socket.SHUT_RDWR)
                        s.close()
                    return
                client.sendall(data)
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)


class _World:
    def __init__(self, direct: Engine, proxied: Engine, bucket: S3Bucket,
                 pool: Pkcs11SessionPool) -> None:  # fmt: skip
        self.direct, self.bucket = direct, bucket
        self.trail = AuditTrail(SqlAuditLog(proxied), None)
        self.store = RecordStore(
            bucket.store, SqlMetadataStore(proxied), Pkcs11KeyWrapper(pool),
            Pkcs11BlindIndexer(pool),
        )  # fmt: skip

    def on_commit(self, ref: RecordRef, insert: Callable[[Connection], None]) -> None:
        """The service's commit gate: the row with its allowed event, one transaction."""
        entry = AuditEntry(
            time=datetime.now(UTC), principal="test-app", action="records.write",
            resource=f"record/{ref.id}/v{ref.version}", outcome="allowed",
            patient_index=ref.patient_index,
        )  # fmt: skip
        self.trail.record_change(entry, insert)

    def objects(self) -> set[str]:
        return {b.key for b in self.bucket.store.list()}

    def rows(self) -> list[tuple[str, str]]:
        with self.direct.connect() as c:
            query = sa.select(records.c.id, records.c.object_key)
            return [(str(r[0]), str(r[1])) for r in c.execute(query).all()]

    def write_events(self) -> int:
        with self.direct.connect() as c:
            query = sa.text("SELECT count(*) FROM audit_events WHERE action = 'records.write'")
            return int(c.execute(query).scalar_one())


@pytest.fixture
def world(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    s3_bucket: S3Bucket,
    keystore_pool: Pkcs11SessionPool,
) -> Iterator[tuple[_World, CommitReplyDropper]]:
    for url in new_database(request, "postgresql", tmp_path_factory):
        direct = make_engine(url)
        upgrade(direct)
        parsed = sa.make_url(url)
        proxy = CommitReplyDropper((parsed.host or "127.0.0.1", parsed.port or 5432))
        proxied = make_engine(parsed.set(host="127.0.0.1", port=proxy.port)
                              .render_as_string(hide_password=False))  # fmt: skip
        world = _World(direct, proxied, s3_bucket, keystore_pool)
        try:
            yield world, proxy
        finally:
            world.trail.close()
            proxied.dispose()
            proxy.close()
            direct.dispose()


def _put(world: _World) -> None:
    header = NewRecord(
        PatientRef(f"SYNTH{secrets.token_hex(6)}", "urn:oid:2.999.1"),
        RecordKind.OTHER,
        "application/octet-stream",
        title="synthetic",
    )
    world.store.put(header, [CONTENT], "test-app", on_commit=world.on_commit)


@pytest.mark.parametrize("stay_down", [False, True], ids=["back-at-once", "still-down"])
def test_a_commit_whose_reply_was_lost_keeps_the_records_object(
    world: tuple[_World, CommitReplyDropper], stay_down: bool, tmp_path: Path
) -> None:
    w, proxy = world
    _put(w)  # one ordinary put first: the pool's connection and the schema are warm
    objects_before, rows_before = w.objects(), w.rows()

    proxy.arm(stay_down=stay_down)
    with pytest.raises(AuditUnavailableError):
        _put(w)
    assert proxy.dropped.is_set(), "the proxy never saw the COMMIT"

    rows = set(w.rows()) - set(rows_before)
    assert len(rows) == 1, f"the in-doubt COMMIT left {len(rows)} new rows (expected 1)"
    ((record_id, key),) = rows
    assert w.write_events() == 2, "the committed row's write event is missing"
    assert key in w.objects() - objects_before, (
        "the object of a committed row was deleted: a visible record without content"
    )
    proxy.restore()
    opened = w.store.open(record_id)
    assert b"".join(opened.content) == CONTENT, "the record does not read back intact"
    if not stay_down:  # looked up and found: tagged now, never swept
        assert w.bucket.store.committed(key), "the committed object was not tagged"
