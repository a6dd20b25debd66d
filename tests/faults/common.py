"""Helpers shared by the fault-injection tests: puts from several threads, sweeps."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import sqlalchemy as sa

from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from service.guard import REPLAY_REASON
from storage.audit_log import audit_events
from storage.sql_metadata import records
from tests.fixtures.service import ROOT, RunningService
from tests.integration.service.calls import header, pieces, requests
from tests.integration.service.streams import data, new_patient


@dataclass(frozen=True)
class Sent:
    """One put attempt: its content is ``data(size, seed)``."""

    patient: pb.PatientId
    size: int
    seed: int

    def content(self) -> bytes:
        return data(self.size, self.seed)

    def sha256(self) -> bytes:
        return hashlib.sha256(self.content()).digest()


@dataclass
class Ledger:
    """What the clients attempted and what the server acknowledged (id, version)."""

    attempted: list[Sent] = field(default_factory=list)
    acknowledged: dict[tuple[str, int], Sent] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attempt(self, sent: Sent) -> None:
        with self.lock:
            self.attempted.append(sent)

    def ack(self, record: pb.Record, sent: Sent) -> None:
        with self.lock:
            self.acknowledged[(record.id, record.version)] = sent

    def fail(self, error: grpc.RpcError) -> None:
        with self.lock:
            name = error.code().name
            self.errors[name] = self.errors.get(name, 0) + 1
            self.details.append(error.details() or "")


def put_one(stub: pb_grpc.RecordServiceStub, sent: Sent, timeout: float = 30) -> pb.Record:
    record: pb.Record = stub.PutRecord(
        requests(header(sent.patient), pieces(sent.content())), timeout=timeout
    )
    return record


def run_clients(
    service: RunningService,
    patients: list[pb.PatientId],
    next_seed: Callable[[], int],
    keep_going: Callable[[], bool],
    ledger: Ledger,
    *,
    stop_on_error: bool,
    size: Callable[[int], int] = lambda seed: 2_000 + (seed * 7919) % 60_000,
) -> None:
    """One thread per patient putting records until ``keep_going`` is false (or, with
    ``stop_on_error``, until its first failed put)."""

    def client(patient: pb.PatientId) -> None:
        with service.channel() as channel:
            stub = pb_grpc.RecordServiceStub(channel)
            while keep_going():
                seed = next_seed()
                sent = Sent(patient, size(seed), seed)
                ledger.attempt(sent)
                try:
                    ledger.ack(put_one(stub, sent), sent)
                except grpc.RpcError as e:
                    ledger.fail(e)
                    if stop_on_error:
                        return

    threads = [threading.Thread(target=client, args=(p,), daemon=True) for p in patients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
        assert not t.is_alive(), "a client thread is stuck"


class Seeds:
    """Distinct content seeds across threads."""

    def __init__(self, start: int) -> None:
        self._next = start
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            self._next += 1
            return self._next


def sweep(service: RunningService, softhsm_conf: str) -> str:
    """``medvault sweep --grace-seconds 0`` against the service's config; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "service", "sweep", "--config", str(service.config_path),
         "--grace-seconds", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "SOFTHSM2_CONF": softhsm_conf},
    )
    assert done.returncode == 0, f"sweep exit {done.returncode}: {done.stderr[-500:]}"
    return done.stdout


def referenced_keys(database_url: str) -> set[str]:
    """The object keys the database's record rows reference."""
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as c:
            return set(c.execute(sa.select(records.c.object_key)).scalars())
    finally:
        engine.dispose()


def expect_one_write_event_per_row(database_url: str) -> int:
    """Each committed version has exactly one allowed write event committed with it (a
    retried put answered with the first put's version has an event of its own, marked
    as a replay). Returns the number of replay events, each naming a committed version."""
    engine = sa.create_engine(database_url)
    writes = (
        sa.select(audit_events.c.resource, sa.func.count())
        .where(audit_events.c.outcome == "allowed")
        .where(audit_events.c.action == "records.write")
        .where(audit_events.c.resource.like("record/%/v%"))
        .group_by(audit_events.c.resource)
    )
    try:
        with engine.connect() as c:
            rows = c.execute(sa.text("SELECT id, version FROM records")).all()
            events = c.execute(writes.where(audit_events.c.reason != REPLAY_REASON)).all()
            replays = c.execute(writes.where(audit_events.c.reason == REPLAY_REASON)).all()
    finally:
        engine.dispose()
    counts = dict(events)
    missing = [f"record/{i}/v{v}" for i, v in rows if counts.get(f"record/{i}/v{v}") != 1]
    assert not missing, f"{len(missing)} rows without exactly one write event: {missing[:3]}"
    assert len(counts) == len(rows), f"{len(counts)} write events for {len(rows)} rows"
    stray = [resource for resource, _ in replays if resource not in counts]
    assert not stray, f"{len(stray)} replay events name no committed version: {stray[:3]}"
    return sum(n for _, n in replays)


@dataclass(frozen=True)
class Call:
    """One call's start and end (monotonic), kind and outcome (None: OK)."""

    began: float
    ended: float
    kind: str
    code: str | None
    details: str


class Load:
    """``clients`` threads, each alternating a put and a read of one of its acknowledged
    records, every call under ``deadline`` seconds; seeds from ``seed`` up, so that two
    loads in one run send different content."""

    def __init__(self, service: RunningService, *, clients: int, seed: int,
                 deadline: float) -> None:  # fmt: skip
        self.service = service
        self.calls: list[Call] = []
        self.acknowledged: dict[tuple[str, int], Sent] = {}
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._seed = seed
        self._deadline = deadline
        self._threads = [threading.Thread(target=self._client, daemon=True)
                         for _ in range(clients)]  # fmt: skip

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=2 * self._deadline + 10)
            assert not t.is_alive(), "a client thread is stuck"

    def _next(self) -> int:
        with self._lock:
            self._seed += 1
            return self._seed

    def _note(self, began: float, kind: str, error: grpc.RpcError | None) -> None:
        call = Call(began, time.monotonic(), kind, error.code().name if error else None,
                    (error.details() or "") if error else "")  # fmt: skip
        with self._lock:
            self.calls.append(call)

    def _client(self) -> None:
        patient = new_patient()
        mine: list[tuple[str, int]] = []
        with self.service.channel() as channel:
            stub = pb_grpc.RecordServiceStub(channel)
            while not self.stop.is_set():
                seed = self._next()
                sent = Sent(patient, 1_000 + seed % 20_000, seed)
                began = time.monotonic()
                try:
                    record = put_one(stub, sent, timeout=self._deadline)
                except grpc.RpcError as e:
                    self._note(began, "put", e)
                else:
                    self._note(began, "put", None)
                    with self._lock:
                        self.acknowledged[(record.id, record.version)] = sent
                    mine.append((record.id, record.version))
                if mine:
                    self._read(stub, mine[seed % len(mine)])

    def _read(self, stub: pb_grpc.RecordServiceStub, key: tuple[str, int]) -> None:
        began = time.monotonic()
        request = pb.GetRecordRequest(id=key[0], version=key[1])
        try:
            for _ in stub.GetRecord(request, timeout=self._deadline):
                pass
        except grpc.RpcError as e:
            self._note(began, "get", e)
        else:
            self._note(began, "get", None)

    def count(self) -> int:
        """How many calls have ended."""
        with self._lock:
            return len(self.calls)

    def snapshot(self) -> list[Call]:
        """Every call ended so far."""
        with self._lock:
            return list(self.calls)

    def calls_since(self, moment: float) -> list[Call]:
        """The calls begun at or after ``moment``."""
        with self._lock:
            return [c for c in self.calls if c.began >= moment]
