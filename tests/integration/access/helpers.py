"""Clients, audit queries and database access shared by the access-control tests.

Assertion messages name codes, actions and counts only: never patient identifiers,
record content or tokens.
"""

from __future__ import annotations

import re
import sqlite3
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa

from service._gen.medvault.v1 import access_pb2 as apb
from service._gen.medvault.v1 import access_pb2_grpc as apb_grpc
from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import audit_pb2_grpc as aupb_grpc
from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from service.localstack.ca import DevCA
from tests.fixtures.service import RunningService, TlsFiles

TIMEOUT = 30
# Content of three 1 MiB segments (about 2.3 MiB): GetRecord streams it after its
# metadata message, in several chunks (put it with ``put_record(..., chunk=1 << 20)``).
THREE_SEGMENTS = bytes(range(256)) * (9 << 10) + b"tail"
AUTHORITY = "urn:oid:2.999.42.7"


def issue_client(tls: TlsFiles, directory: Path, name: str, role: str | None) -> tuple[Path, Path]:
    issued = DevCA.load_or_create(tls.ca.parent).issue_client(directory, name, role=role)
    return issued.cert, issued.key


def new_patient() -> pb.PatientId:
    return pb.PatientId(id=f"A{uuid.uuid4().hex}", assigning_authority=AUTHORITY)


@dataclass
class Client:
    """One principal's channel and stubs."""

    name: str
    channel: grpc.Channel
    records: pb_grpc.RecordServiceStub = field(init=False)
    access: apb_grpc.AccessServiceStub = field(init=False)
    audit: aupb_grpc.AuditServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.records = pb_grpc.RecordServiceStub(self.channel)
        self.access = apb_grpc.AccessServiceStub(self.channel)
        self.audit = aupb_grpc.AuditServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()


def client(service: RunningService, cert: tuple[Path, Path], name: str = "") -> Client:
    return Client(name, service.channel(*cert))


def put_record(
    c: Client, patient: pb.PatientId, content: bytes = b"synthetic note", chunk: int = 0
) -> pb.Record:
    """Put ``content`` as one chunk, or as chunks of ``chunk`` bytes."""
    head = pb.RecordHeader(
        patient=patient, kind=pb.RECORD_KIND_OTHER, content_type="application/octet-stream"
    )
    step = chunk or max(len(content), 1)
    chunks = [
        pb.PutRecordRequest(chunk=content[i : i + step]) for i in range(0, len(content), step)
    ]
    stream = iter([pb.PutRecordRequest(header=head), *(chunks or [pb.PutRecordRequest(chunk=b"")])])
    record: pb.Record = c.records.PutRecord(stream, timeout=TIMEOUT)
    return record


@dataclass
class Fetched:
    metadata: pb.Record | None
    content: bytes
    error: grpc.RpcError | None

    @property
    def code(self) -> grpc.StatusCode:
        return self.error.code() if self.error is not None else grpc.StatusCode.OK


def fetch(
    c: Client,
    record_id: str,
    metadata: tuple[tuple[str, str], ...] = (),
    *,
    offset: int = 0,
    length: int = 0,
    timeout: float = TIMEOUT,
) -> Fetched:
    """A whole GetRecord (of ``length`` bytes from ``offset``; 0: to the end)."""
    got: pb.Record | None = None
    content = bytearray()
    request = pb.GetRecordRequest(id=record_id, range=pb.ByteRange(offset=offset, length=length))
    try:
        for response in c.records.GetRecord(request, timeout=timeout, metadata=metadata or None):
            if response.WhichOneof("message") == "metadata":
                got = response.metadata
            else:
                content += response.chunk
    except grpc.RpcError as e:
        return Fetched(got, bytes(content), e)
    return Fetched(got, bytes(content), None)


def code_of(call: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.StatusCode:
    """Run a unary or server-streaming call to its end; its status code."""
    try:
        result = call(*args, **kwargs)
        if isinstance(result, Iterator) or hasattr(result, "__next__"):
            for _ in result:
                pass
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def grant(clerk: Client, patient: pb.PatientId, principal: str) -> apb.Grant:
    reply: apb.Grant = clerk.access.GrantAccess(
        apb.GrantAccessRequest(patient=patient, principal=principal), timeout=TIMEOUT
    )
    return reply


def events(officer: Client, **filters: Any) -> list[aupb.AuditEvent]:
    """Audit events matching ``filters`` (QueryEventsRequest fields), oldest first."""
    request = aupb.QueryEventsRequest(**filters)
    return list(officer.audit.QueryEvents(request, timeout=120))


def verify(officer: Client) -> aupb.VerifyChainResponse:
    reply: aupb.VerifyChainResponse = officer.audit.VerifyChain(
        aupb.VerifyChainRequest(), timeout=120
    )
    return reply


class Metrics:
    """The server's Prometheus endpoint."""

    def __init__(self, port: int) -> None:
        self._url = f"http://127.0.0.1:{port}/metrics"

    def value(self, name: str) -> float:
        with urllib.request.urlopen(self._url, timeout=5) as reply:
            text = reply.read().decode()
        found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert found, f"{name} not exported"
        return float(found.group(1))


def wait_for(predicate: Callable[[], bool], timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def engine_for(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        return sa.create_engine(url, connect_args={"timeout": 30})
    return sa.create_engine(url, connect_args={"connect_timeout": 5})


def started(factory: Any, database_url: str, **options: Any) -> RunningService:
    service: RunningService = factory(database_url, **options)
    return service


@contextmanager
def audit_writer_held(url: str, engine: sa.Engine) -> Iterator[None]:
    """The audit writer waits while the block runs: PostgreSQL, a lock on the chain's
    head; SQLite, the database's write lock (WAL: rows are still readable), which fails
    its append once the block outlasts the 5 s busy timeout."""
    if url.startswith("sqlite"):
        holder = sqlite3.connect(sa.make_url(url).database or "", isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        return
    with engine.connect() as lock:
        lock.execute(sa.text("LOCK TABLE audit_head IN ACCESS EXCLUSIVE MODE"))
        try:
            yield
        finally:
            lock.rollback()


@contextmanager
def inserts_refused(
    url: str, engine: sa.Engine, table: str, message: str, *, when: str = "", sqlstate: str = ""
) -> Iterator[None]:
    """Inserts into ``table`` raise ``message`` while the block runs (a trigger a database
    writer could add): every one, or those matching the SQL condition ``when`` over
    ``NEW``; on PostgreSQL with ``sqlstate`` if given (SQLite: RAISE(FAIL))."""
    name = f"{table}_refused"
    sqlite = url.startswith("sqlite")
    with engine.begin() as c:
        if sqlite:
            c.execute(sa.text(
                f"CREATE TRIGGER {name} BEFORE INSERT ON {table} "
                f"{'WHEN ' + when if when else ''} "
                f"BEGIN SELECT RAISE(FAIL, '{message}'); END"
            ))  # fmt: skip
        else:
            code = f" USING ERRCODE = '{sqlstate}'" if sqlstate else ""
            c.execute(sa.text(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF {when or 'true'} THEN RAISE EXCEPTION '{message}'{code}; "
                "END IF; RETURN NEW; END $$"
            ))  # fmt: skip
            c.execute(sa.text(
                f"CREATE TRIGGER {name} BEFORE INSERT ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION {name}()"
            ))  # fmt: skip
    try:
        yield
    finally:
        with engine.begin() as c:
            if sqlite:
                c.execute(sa.text(f"DROP TRIGGER {name}"))
            else:
                c.execute(sa.text(f"DROP TRIGGER {name} ON {table}"))
                c.execute(sa.text(f"DROP FUNCTION {name}()"))


def audit_inserts_refused(
    url: str, engine: sa.Engine, when: str = ""
) -> AbstractContextManager[None]:
    """Audit inserts raise while the block runs (a trigger a database writer could add):
    every one, or those matching the SQL condition ``when`` over ``NEW``."""
    return inserts_refused(url, engine, "audit_events", "injected audit write error", when=when)
