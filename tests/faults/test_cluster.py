"""Issue 10 on the cluster topology: replicas, a replicated SeaweedFS, and the faults they absorb.

One ``medvault stack up --topology cluster`` per module (tests/faults/cluster.py): two
replicas on one PostgreSQL database, one token and one bucket, over a SeaweedFS master,
three volume servers (replication 001), a filer and the S3 gateway. Clients use the
CLI's own channel: both replica addresses, round robin, retries of idempotent calls.

* calls spread over both replicas; one audit chain, one sweeper, one scheduled backup
  per slot across them; MLLP and DICOM listen on every replica;
* a volume server SIGKILLed: every stored record still reads back identical, and new
  writes go on (the master drops the lost server's volumes from the writable set);
* a replica SIGKILLed under concurrent uploads and downloads: every acknowledged record
  reads back identical through the survivor, nothing unacknowledged is visible, no put
  is stored twice, and the clients finish on the survivor while the killed replica is
  restarted (``stack up``, as a supervisor would);
* the S3 gateway stopped for 30 s under load: calls fail UNAVAILABLE naming the object
  store, the object store's health goes NOT_SERVING on both replicas and back, at least
  99% of the first 200 calls after its return succeed, nothing acknowledged is lost;
* replica 2 started with ``MEDVAULT_FAULT=sigkill:<point>:<n>`` for each write-path point
  in turn while clients put: the clients finish on replica 1, no acknowledged put is lost,
  nothing unacknowledged or unreadable is visible, and a sweep leaves exactly the
  referenced objects.

Figures are printed as one JSON line per test (``-s`` shows them; docs/reliability.md).
PYTEST_DONT_REWRITE: failures name counts, never content.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import audit_pb2_grpc as aupb_grpc
from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from service.bootstrap import FAULT_ENV
from service.cli.main import parser
from service.localstack.seaweed_cluster import component_names
from service.localstack.service_proc import check_health
from storage.records import WRITE_FAULT_POINTS
from tests.faults.cluster import (
    BACKUP_SECONDS,
    RECORDS_BUCKET,
    REPLICAS,
    SWEEP_SECONDS,
    Cluster,
    cluster_stack,
)
from tests.faults.cluster import orphan_sweeps as sweeps_logged
from tests.faults.common import expect_one_write_event_per_row, referenced_keys
from tests.fixtures.databases import new_database
from tests.integration.service.calls import fetch, header, list_all, pieces, requests
from tests.integration.service.streams import new_patient

pytestmark = pytest.mark.integration
TIMEOUT = 20
T = TypeVar("T")
CLIENTS = 4


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    databases = new_database(request, "postgresql", tmp_path_factory)
    try:
        yield from cluster_stack(tmp_path_factory.mktemp("cluster"), next(databases))
    finally:
        databases.close()


def put(stub: pb_grpc.RecordServiceStub, patient: pb.PatientId, content: bytes,
        request_id: str) -> pb.Record:  # fmt: skip
    record: pb.Record = stub.PutRecord(
        requests(header(patient, request_id=request_id), pieces(content)), timeout=TIMEOUT
    )
    return record


def read(stub: pb_grpc.RecordServiceStub, key: tuple[str, int]) -> bytes:
    fetched = fetch(stub, key[0], key[1])
    if fetched.error is not None:
        raise fetched.error
    return fetched.content


def _differing(stub: pb_grpc.RecordServiceStub, expected: dict[tuple[str, int], bytes]) -> int:
    """How many of ``expected`` read back different (four reads at a time)."""
    with ThreadPoolExecutor(4) as pool:
        return sum(pool.map(lambda item: read(stub, item[0]) != item[1], expected.items()))


def against_acknowledged(
    cluster: Cluster, load: Workload, endpoints: list[str] | None = None
) -> tuple[set[tuple[str, int]], set[tuple[str, int]], int]:
    """Through ``endpoints`` (all replicas by default): the acknowledged records not
    visible, the visible ones never acknowledged, and how many acknowledged ones read
    back different (GetRecord authenticates the row and decrypts and checks the object)."""
    with cluster.channel(endpoints) as channel:
        stub = pb_grpc.RecordServiceStub(channel)
        visible = {(r.id, r.version) for p in load.patients
                   for r in list_all(stub, p, all_versions=True)}  # fmt: skip
        acknowledged = set(load.acknowledged)
        return acknowledged - visible, visible - acknowledged, _differing(stub, load.acknowledged)


def verify_chain(cluster: Cluster) -> aupb.VerifyChainResponse:
    with cluster.channel(as_="security_officer") as channel:
        reply: aupb.VerifyChainResponse = aupb_grpc.AuditServiceStub(channel).VerifyChain(
            aupb.VerifyChainRequest(), timeout=120
        )
    return reply


def one_chain(cluster: Cluster) -> tuple[int, int]:
    """(events, highest sequence) of the audit table: one gapless chain from 1."""
    engine = cluster.engine()
    try:
        with engine.connect() as c:
            row = c.execute(sa.text(
                "SELECT COUNT(*), COUNT(DISTINCT sequence), MIN(sequence), MAX(sequence) "
                "FROM audit_events"
            )).one()  # fmt: skip
    finally:
        engine.dispose()
    count, distinct, low, high = row
    assert count == distinct == high, f"audit sequences {low}..{high}, {count} rows"
    assert low == 1, f"audit sequences start at {low}"
    return int(count), int(high)


def scheduled_backups(cluster: Cluster) -> tuple[list[Any], int]:
    """Finished scheduled backup runs, and the scheduler's ``backup.run`` audit events."""
    engine = cluster.engine()
    try:
        with engine.connect() as c:
            runs = c.execute(sa.text(
                "SELECT slot, replica, outcome FROM backup_runs WHERE kind = 'backup'"
            )).all()  # fmt: skip
            events = c.scalar(sa.text(
                "SELECT COUNT(*) FROM audit_events WHERE action = 'backup.run' "
                "AND principal = 'scheduler'"
            ))  # fmt: skip
    finally:
        engine.dispose()
    return [r for r in runs if r.outcome != "running"], int(events or 0)


def stack_command(*args: str) -> int:
    """``medvault stack ...`` in this process (what the console script runs, minus logging)."""
    ns = parser().parse_args(["stack", *args])
    return int(ns.func(ns))


def test_calls_spread_one_chain_one_sweeper_one_scheduled_run(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = cluster.stack
    puts_before = [cluster.calls(i, "RecordService/PutRecord") for i in range(1, REPLICAS + 1)]
    stored: dict[tuple[str, int], bytes] = {}
    with cluster.channel() as channel:
        stub = pb_grpc.RecordServiceStub(channel)
        patient = new_patient()
        for n in range(20):
            content = secrets.token_bytes(1_000 + 500 * n)
            record = put(stub, patient, content, str(uuid.uuid4()))
            stored[(record.id, record.version)] = content
        mismatched = [k for k, content in stored.items() if read(stub, k) != content]
    assert not mismatched, f"{len(mismatched)} records read back different"
    spread = [cluster.calls(i, "RecordService/PutRecord") - b for i, b in enumerate(puts_before, 1)]
    assert sum(spread) == len(stored), f"puts per replica {spread}"
    assert min(spread) >= len(stored) // 4, f"round robin left a replica idle: {spread}"

    # What `medvault stack status` and `stack env` say of this home, found without flags.
    capsys.readouterr()
    assert stack_command("status", "--home", str(stack.home)) == 0, "a component is down"
    states = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert all(states[n] == "running" for n in component_names()), states
    assert all(states[f"replica-{i}"] == "running" for i in range(1, REPLICAS + 1)), states
    assert stack_command("env", "--home", str(stack.home)) == 0
    assert f"MEDVAULT_ENDPOINT={','.join(stack.endpoints())}\n" in capsys.readouterr().out

    ports = [stack.replica_ports(i) for i in range(1, REPLICAS + 1)]
    for listener in ("grpc", "metrics", "mllp", "dicom"):
        mine = [p[listener] for p in ports]
        assert len(set(mine)) == REPLICAS, f"{listener} ports shared: {mine}"
        for port in mine:  # each replica accepts connections on each of its listeners
            socket.create_connection(("127.0.0.1", port), timeout=5).close()

    # A measurement window: how often the replicas sweep in it. It lasts at least 6 s and
    # until two sweeps were logged (a slow host sweeps late; at most 60 s), and the bound
    # is taken over the time it really lasted.
    swept_before, began = sweeps_logged(stack), time.monotonic()
    while time.monotonic() - began < 60 and (
        time.monotonic() - began < 6 or sweeps_logged(stack) - swept_before < 2
    ):
        time.sleep(0.2)
    rounds = (time.monotonic() - began) / SWEEP_SECONDS
    swept = sweeps_logged(stack) - swept_before
    assert 2 <= swept <= rounds + 2, f"{swept} sweeps in {rounds:.0f} intervals"

    # A run's ledger row is finished before its audit event is committed: wait for both.
    seen: list[tuple[list[Any], int]] = []

    def settled() -> bool:
        seen.append(scheduled_backups(cluster))
        finished, events = seen[-1]
        return len(finished) >= 2 and events == len(finished)

    try:
        _wait(settled, 120, "two scheduled backups, each with its audit event")
    except AssertionError:
        finished, events = seen[-1]
        raise AssertionError(f"{len(finished)} scheduled backups, {events} audit events") from None
    finished = seen[-1][0]
    assert all(r.outcome == "ok" for r in finished), [r.outcome for r in finished]

    chain = verify_chain(cluster)
    assert chain.ok, f"audit chain: {chain.reason} at {chain.first_bad_sequence}"
    events_total, _ = one_chain(cluster)
    print(json.dumps({
        "puts_per_replica": spread,
        "sweeps_in_window": swept, "sweep_intervals": round(rounds, 1),
        "scheduled_backups": len(finished), "backup_every_s": BACKUP_SECONDS,
        "replicas_that_ran_backups": len({r.replica for r in finished}),
        "audit_events": events_total,
    }))  # fmt: skip


def test_a_volume_server_lost(cluster: Cluster) -> None:
    """SIGKILL the volume server holding the most copies: reads and writes go on; it rejoins."""
    seaweed = cluster.stack.seaweed_cluster()
    stored: dict[tuple[str, int], bytes] = {}
    patient = new_patient()
    with cluster.channel() as channel:
        stub = pb_grpc.RecordServiceStub(channel)
        for n in range(30):
            content = secrets.token_bytes(2_000 + 1_000 * n)
            record = put(stub, patient, content, str(uuid.uuid4()))
            stored[(record.id, record.version)] = content
        # Every volume of the records' bucket is written twice (001) on two servers; the
        # one lost is the server holding the most of them.
        volumes = seaweed.volumes(RECORDS_BUCKET).values()
        assert volumes, "the master lists no volume of the records' bucket"
        assert {(v.placement, len(v.holders)) for v in volumes} == {("001", 2)}, volumes
        held = Counter(h for v in volumes for h in v.holders)
        victim = held.most_common(1)[0][0]
        seaweed.stop_component(victim, signal.SIGKILL)
        lost_at = time.monotonic()
        nodes_after = seaweed.data_nodes()
        bad_reads = sum(read(stub, k) != content for k, content in stored.items())
        reads_took = time.monotonic() - lost_at
        written: dict[tuple[str, int], bytes] = {}
        refused: list[str] = []
        for n in range(20):
            content = secrets.token_bytes(2_000 + 1_000 * n)
            try:
                record = put(stub, patient, content, str(uuid.uuid4()))
            except grpc.RpcError as e:
                refused.append(e.code().name)
            else:
                written[(record.id, record.version)] = content
        bad_new = sum(read(stub, k) != content for k, content in written.items())
        restarted = time.monotonic()
        seaweed.start_component(victim)  # returns once the master counts it again
        rejoined = time.monotonic() - restarted
        bad_after = sum(read(stub, k) != c for k, c in {**stored, **written}.items())
    assert bad_reads == 0, f"{bad_reads} of {len(stored)} reads differ with a volume server lost"
    assert not refused, f"writes refused with a volume server lost: {refused}"
    assert bad_new == bad_after == 0, "a record written during the loss reads back different"
    print(json.dumps({
        "records_before": len(stored), "volumes": len(volumes),
        "volumes_on_the_lost_server": held[victim],
        "volume_servers_alive_after_kill": nodes_after,
        "reads_after_kill": len(stored), "reads_failed": bad_reads,
        "reads_took_s": round(reads_took, 2), "writes_during_loss": 20,
        "writes_refused": len(refused), "volume_server_rejoined_s": round(rejoined, 2),
    }))  # fmt: skip


@dataclass(frozen=True)
class Call:
    """One call's start and end (monotonic), kind, outcome (None: OK), app retries and
    the last error's message."""

    began: float
    ended: float
    kind: str
    code: str | None
    retries: int
    details: str = ""


@dataclass
class Workload:
    """Clients putting (with a request id, retried on UNAVAILABLE up to ``client_retries``
    times) and, with ``read_back``, reading one of their records back after each put."""

    cluster: Cluster
    client_retries: int = 4
    read_back: bool = True
    pause: float = 0.0  # seconds each client waits after a put (pacing, not correctness)
    max_size: int = 60_000
    acknowledged: dict[tuple[str, int], bytes] = field(default_factory=dict)
    patients: list[pb.PatientId] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    gave_up: list[str] = field(default_factory=list)
    mismatches: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        return threads

    def _attempt(self, kind: str, call: Callable[[], T]) -> T | None:
        """``call`` until it succeeds, fails other than UNAVAILABLE or has been retried
        ``client_retries`` times."""
        began = time.monotonic()
        for retries in range(self.client_retries + 1):
            try:
                result = call()
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE and retries < self.client_retries:
                    time.sleep(0.2)
                    continue
                code, details = e.code().name, e.details() or ""
                self._note(Call(began, time.monotonic(), kind, code, retries, details))
                with self.lock:
                    self.gave_up.append(f"{kind}: {e.code().name}")
                return None
            self._note(Call(began, time.monotonic(), kind, None, retries))
            return result
        return None

    def _note(self, call: Call) -> None:
        with self.lock:
            self.calls.append(call)

    def _client(self) -> None:
        patient = new_patient()
        with self.lock:
            self.patients.append(patient)
        mine: list[tuple[str, int]] = []
        with self.cluster.channel() as channel:
            stub = pb_grpc.RecordServiceStub(channel)
            while not self.stop.is_set():
                content = secrets.token_bytes(1_000 + secrets.randbelow(self.max_size))
                key = str(uuid.uuid4())
                record = self._attempt("put", lambda c=content, k=key: put(stub, patient, c, k))
                if record is not None:
                    with self.lock:
                        self.acknowledged[(record.id, record.version)] = content
                    mine.append((record.id, record.version))
                if self.pause:
                    self.stop.wait(self.pause)
                if mine and self.read_back:
                    wanted = mine[secrets.randbelow(len(mine))]
                    got = self._attempt("get", lambda w=wanted: read(stub, w))
                    if got is not None and got != self.acknowledged[wanted]:
                        with self.lock:
                            self.mismatches += 1

    def puts_acknowledged(self) -> int:
        with self.lock:
            return len(self.acknowledged)

    def snapshot(self) -> list[Call]:
        with self.lock:
            return list(self.calls)

    def finish(self, threads: list[threading.Thread]) -> None:
        self.stop.set()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a client thread is stuck"


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {timeout:.0f} s"
        time.sleep(0.05)


def test_a_replica_killed_during_uploads_and_downloads(cluster: Cluster) -> None:
    stack = cluster.stack
    victim, survivor = REPLICAS, 1
    load = Workload(cluster)
    back_in: list[float] = []

    def restart_victim() -> None:
        began = time.monotonic()
        stack.start_service(health_timeout=90)
        back_in.append(time.monotonic() - began)

    restart = threading.Thread(target=restart_victim, daemon=True)
    threads = load.run()
    try:
        _wait(lambda: load.puts_acknowledged() >= 25, 60, "25 puts acknowledged")
        pid = stack.replica(victim).pid
        assert pid is not None, "the replica to kill is not running"
        os.killpg(pid, signal.SIGKILL)  # the whole replica, whatever its processes
        killed_at, acked_at_kill = time.monotonic(), load.puts_acknowledged()
        # Restarted once it has exited, as a supervisor (systemd's Restart=) would, while
        # the load goes on: `stack up` starts the missing replica, returns once healthy.
        _wait(lambda: stack.replica(victim).pid is None, 10, "the killed replica gone")
        restart.start()
        _wait(
            lambda: (
                load.puts_acknowledged() >= acked_at_kill + 25 and time.monotonic() - killed_at >= 3
            ),
            90,
            "25 puts acknowledged after the kill",
        )
    finally:
        load.stop.set()
        for t in [*threads, restart]:
            if t.ident is not None:
                t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a client thread is stuck"
    assert back_in, "the killed replica did not come back (see its log)"
    assert stack.replica(victim).pid not in (None, pid), "the killed replica is not running"
    assert not load.gave_up, f"clients gave up: {load.gave_up}"
    assert load.mismatches == 0, f"{load.mismatches} reads differed from what was stored"

    lost, unacknowledged, differ = against_acknowledged(
        cluster, load, [stack.endpoints()[survivor - 1]]
    )
    assert not lost, f"{len(lost)} acknowledged records lost"
    assert not unacknowledged, f"{len(unacknowledged)} records visible but never acknowledged"
    assert differ == 0, f"{differ} acknowledged records read back different via the survivor"

    chain = verify_chain(cluster)
    assert chain.ok, f"audit chain: {chain.reason} at {chain.first_bad_sequence}"
    events, _ = one_chain(cluster)

    after_kill = [c for c in load.calls if c.ended >= killed_at]
    straddling = [c for c in load.calls if c.began < killed_at <= c.ended]
    first_ok = min((c.ended for c in after_kill if c.code is None and c.began >= killed_at),
                   default=float("nan"))  # fmt: skip
    orphans = len(cluster.bucket_keys() - referenced_keys(cluster.database_url))
    print(json.dumps({
        "calls": len(load.calls),
        "puts_acknowledged": len(load.acknowledged),
        "acknowledged_before_kill": acked_at_kill,
        "gets": sum(c.kind == "get" for c in load.calls),
        "calls_retried_by_client": sum(c.retries > 0 for c in load.calls),
        "client_retries": sum(c.retries for c in load.calls),
        "client_retried_kinds": sorted(c.kind for c in load.calls if c.retries > 0),
        "calls_in_flight_at_kill": len(straddling),
        "longest_call_across_kill_s": round(max((c.ended - c.began for c in straddling),
                                               default=0.0), 2),
        "first_success_after_kill_s": round(first_ok - killed_at, 2),
        "acknowledged_lost": len(lost), "unacknowledged_visible": len(unacknowledged),
        "orphan_objects_left": orphans, "replica_restart_s": round(back_in[0], 2),
        "audit_events": events,
    }))  # fmt: skip


# -- the S3 gateway stopped under load ------------------------------------------------

OUTAGE_SECONDS = float(os.environ.get("MEDVAULT_FAULT_CLUSTER_OUTAGE_SECONDS", "30"))
AFTER_RETURN_CALLS = 200  # the first calls begun after the return: at least 99% succeed
RECOVERY_SECONDS = 10.0  # and none begun later than this after the return fails
OBJECT_STORE = "medvault.dependency.object_store"


class HealthWatch:
    """Polls one dependency's health on each replica (a channel to it alone); keeps each
    change of status with its time."""

    def __init__(self, cluster: Cluster, service: str) -> None:
        self.changes: dict[int, list[tuple[float, str]]] = {i: [] for i in range(1, REPLICAS + 1)}
        self._cluster, self._service = cluster, service
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in self.changes]  # fmt: skip

    def __enter__(self) -> HealthWatch:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)

    def _run(self, index: int) -> None:
        endpoint = self._cluster.stack.endpoints()[index - 1]
        with self._cluster.channel([endpoint]) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.wait(0.1):
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=self._service),
                                       timeout=2)  # fmt: skip
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as e:
                    status = f"error {e.code().name}"
                changes = self.changes[index]
                if not changes or changes[-1][1] != status:
                    changes.append((time.monotonic(), status))

    def now(self, index: int) -> str:
        changes = self.changes[index]
        return changes[-1][1] if changes else ""

    def outage(self, index: int, since: float) -> tuple[float | None, float | None]:
        """Replica ``index``'s first NOT_SERVING after ``since``, and its first SERVING after it."""
        changes = list(self.changes[index])
        down = next((t for t, s in changes if s == "NOT_SERVING" and t >= since), None)
        up = None if down is None else next(
            (t for t, s in changes if s == "SERVING" and t >= down), None
        )  # fmt: skip
        return down, up


def _since(moment: float | None, origin: float) -> float | None:
    return None if moment is None else round(moment - origin, 2)


@pytest.mark.timeout(300)
def test_the_s3_gateway_stopped_under_load(cluster: Cluster) -> None:
    """Both replicas lose their object store (the ``weed s3`` gateway) for
    ``MEDVAULT_FAULT_CLUSTER_OUTAGE_SECONDS`` (30) under load; neither is restarted."""
    stack, seaweed = cluster.stack, cluster.stack.seaweed_cluster()
    replicas = range(1, REPLICAS + 1)
    pids = [stack.replica(i).pid for i in replicas]
    load = Workload(cluster, client_retries=0)  # each failure counted as the client saw it
    with HealthWatch(cluster, OBJECT_STORE) as health:
        _wait(lambda: all(health.now(i) == "SERVING" for i in replicas), 30,
              "the object store SERVING on both replicas")  # fmt: skip
        threads = load.run()
        try:
            _wait(lambda: load.puts_acknowledged() >= 20, 60, "20 puts acknowledged")
            stopped_at = time.monotonic()
            seaweed.stop_component("s3")
            down_from = time.monotonic()
            # The outage itself: the fault's length, not a wait for a result.
            _wait(lambda: time.monotonic() - down_from >= OUTAGE_SECONDS, OUTAGE_SECONDS + 5,
                  "through the outage")  # fmt: skip
            seaweed.start_component("s3")  # returns once S3 lists buckets again
            back_at = time.monotonic()
            _wait(lambda: sum(c.began >= back_at for c in load.snapshot()) >= AFTER_RETURN_CALLS,
                  120, f"{AFTER_RETURN_CALLS} calls begun after the return")  # fmt: skip
            _wait(lambda: all(health.outage(i, stopped_at)[1] for i in replicas), 30,
                  "the object store SERVING again on both replicas")  # fmt: skip
        finally:
            load.finish(threads)
    assert [stack.replica(i).pid for i in replicas] == pids, "a replica was restarted"

    calls = load.snapshot()
    during = [c for c in calls if down_from <= c.began < back_at]
    failed = [c for c in during if c.code is not None]
    assert failed, "no call failed while the object store was down"
    codes = sorted({c.code or "" for c in failed})
    assert codes == ["UNAVAILABLE"], f"outage failures: {codes}"
    unclear = [c for c in failed if "object store" not in c.details
               or "retry later" not in c.details]  # fmt: skip
    assert not unclear, f"{len(unclear)} UNAVAILABLE replies do not name the object store"
    health_seen = {i: health.outage(i, stopped_at) for i in replicas}
    for i, (down, up) in health_seen.items():
        assert (down or back_at) < back_at, f"replica {i}: object store never NOT_SERVING"
        assert up is not None, f"replica {i}: object store not SERVING again"

    after = sorted((c for c in calls if c.began >= back_at), key=lambda c: c.began)
    first = after[:AFTER_RETURN_CALLS]
    ok_first = sum(c.code is None for c in first)
    assert ok_first >= 0.99 * len(first), f"{ok_first} of the first {len(first)} calls succeeded"
    late = [c for c in after if c.code is not None and c.began >= back_at + RECOVERY_SECONDS]
    assert not late, f"{len(late)} calls begun {RECOVERY_SECONDS:.0f} s after the return failed"
    first_ok = min((c.ended for c in calls if c.code is None and c.ended >= back_at),
                   default=float("nan"))  # fmt: skip
    failures_after = [c for c in calls if c.code is not None and c.ended >= back_at]

    lost, unacknowledged, differ = against_acknowledged(cluster, load)
    assert not lost, f"{len(lost)} acknowledged records lost"
    assert not unacknowledged, f"{len(unacknowledged)} records visible but never acknowledged"
    assert differ == 0, f"{differ} acknowledged records read back different"
    keys, referenced = cluster.bucket_keys(), referenced_keys(cluster.database_url)
    assert referenced <= keys, f"{len(referenced - keys)} rows reference a missing object"
    chain = verify_chain(cluster)
    assert chain.ok, f"audit chain: {chain.reason} at {chain.first_bad_sequence}"
    events, _ = one_chain(cluster)
    print(json.dumps({
        "outage_s": round(back_at - stopped_at, 1), "calls": len(calls),
        "calls_during_outage": len(during), "failed_during_outage": len(failed),
        "ok_during_outage_ended_after_return": sum(c.code is None and c.ended >= back_at
                                                   for c in during),
        "longest_failing_call_s": round(max(c.ended - c.began for c in failed), 2),
        "not_serving_after_stop_s": [_since(d, stopped_at) for d, _ in health_seen.values()],
        "serving_after_return_s": [_since(u, back_at) for _, u in health_seen.values()],
        "puts_acknowledged": len(load.acknowledged), "acknowledged_lost": len(lost),
        "unacknowledged_visible": len(unacknowledged),
        "first_success_after_return_s": round(first_ok - back_at, 2),
        "failures_ending_after_return": len(failures_after),
        "first_calls_after_return": len(first), "of_which_ok": ok_first,
        "those_calls_spanned_s": round(first[-1].began - back_at, 2),
        "orphan_objects": len(keys - referenced), "audit_events": events,
    }))  # fmt: skip


# -- SIGKILL at each named point of the write path, on one replica --------------------

KILL_ROUNDS = int(os.environ.get("MEDVAULT_FAULT_CLUSTER_KILL_ROUNDS", "1"))
# At least 200 uploads across the kills, as in the single-node (SQLite) module: this is
# the PostgreSQL half of that check.
KILL_UPLOADS = int(os.environ.get("MEDVAULT_FAULT_CLUSTER_KILL_UPLOADS", "200"))


@dataclass(frozen=True)
class Kill:
    """One armed start of a replica: when it was started, seen healthy and gone."""

    fault: str
    started: float
    healthy: float | None  # None: it killed itself before a health check passed
    died: float
    status: int | None


def _armed_start(cluster: Cluster, index: int, fault: str) -> Kill:
    """Start replica ``index`` with ``MEDVAULT_FAULT=fault``; return once it has exited."""
    stack = cluster.stack
    replica, endpoint, tls = stack.replica(index), stack.endpoints()[index - 1], stack.tls_client()
    started = time.monotonic()
    replica.start({**stack.service_env(), FAULT_ENV: fault})
    healthy = None
    while replica.pid is not None:
        if healthy is None and check_health(endpoint, tls, timeout=2.0):
            healthy = time.monotonic()
        assert time.monotonic() - started < 120, f"{fault}: replica {index} never fired"
        time.sleep(0.05)
    return Kill(fault, started, healthy, time.monotonic(), replica.exit_status)


@pytest.mark.timeout(900)
def test_sigkill_at_each_write_point_on_a_replica(cluster: Cluster) -> None:
    """Replica 2 is started with ``MEDVAULT_FAULT=sigkill:<point>:<n>`` for each named point
    in turn (``MEDVAULT_FAULT_CLUSTER_KILL_ROUNDS`` rounds) while clients keep putting
    through both replicas; each time it kills itself, the next armed start follows."""
    stack = cluster.stack
    victim, survivor = REPLICAS, 1
    survivor_endpoint = stack.endpoints()[survivor - 1]
    schedule = [f"sigkill:{point}:{1 + (index + round_) % 3}"
                for round_ in range(KILL_ROUNDS)
                for index, point in enumerate(WRITE_FAULT_POINTS)]  # fmt: skip
    stack.replica(victim).stop()  # to be started armed
    # Paced (at most 4 puts a second in all) so that the read-back stays short.
    load = Workload(cluster, read_back=False, pause=1.0, max_size=16_000)
    kills: list[Kill] = []
    threads = load.run()
    try:
        for fault in schedule:
            kills.append(_armed_start(cluster, victim, fault))
        _wait(lambda: any(c.code is None and c.began >= kills[-1].died for c in load.snapshot()),
              30, "a put acknowledged after the last kill")  # fmt: skip
        _wait(lambda: sum(c.kind == "put" for c in load.snapshot()) >= KILL_UPLOADS, 900,
              f"{KILL_UPLOADS} uploads")  # fmt: skip
    finally:
        load.finish(threads)
    # Back unarmed, as a supervisor would, while the checks go through the survivor.
    restart = threading.Thread(target=stack.start_service, kwargs={"health_timeout": 90})
    restart.start()
    try:
        not_killed = [k.fault for k in kills if k.status != -signal.SIGKILL]
        assert not not_killed, f"replica ended other than by its fault: {not_killed}"
        assert not load.gave_up, f"clients gave up: {load.gave_up}"

        lost, unacknowledged, differ = against_acknowledged(cluster, load, [survivor_endpoint])
        assert not lost, f"{len(lost)} acknowledged records lost"
        assert not unacknowledged, f"{len(unacknowledged)} records visible, never acknowledged"
        assert differ == 0, f"{differ} acknowledged records read back different"

        keys, referenced = cluster.bucket_keys(), referenced_keys(cluster.database_url)
        assert referenced <= keys, f"{len(referenced - keys)} rows reference a missing object"
        swept = cluster.sweep()
        keys_after = cluster.bucket_keys()
        assert keys_after == referenced, (
            f"{len(keys_after - referenced)} unreferenced objects left after the sweep, "
            f"{len(referenced - keys_after)} referenced objects gone"
        )
        replays = expect_one_write_event_per_row(cluster.database_url)
        chain = verify_chain(cluster)
        assert chain.ok, f"audit chain: {chain.reason} at {chain.first_bad_sequence}"
        events, _ = one_chain(cluster)
    finally:
        restart.join(timeout=120)
    assert stack.replica(victim).pid is not None, "the replica did not come back unarmed"

    calls = load.snapshot()
    puts = [c for c in calls if c.kind == "put"]
    per_kill = []
    for k in kills:
        in_flight = [c for c in calls if c.began < k.died <= c.ended]
        after = [c.ended for c in calls if c.began >= k.died and c.code is None]
        per_kill.append({
            "fault": k.fault.removeprefix("sigkill:"),
            "start_to_healthy_s": _since(k.healthy, k.started),
            "healthy_to_kill_s": _since(k.died, k.healthy) if k.healthy else None,
            "calls_in_flight": len(in_flight),
            "longest_across_kill_s": round(max((c.ended - c.began for c in in_flight),
                                               default=0.0), 2),
            "first_success_after_s": round(min(after, default=float("nan")) - k.died, 2),
        })  # fmt: skip
    print(json.dumps({
        "kills": len(kills), "rounds": KILL_ROUNDS, "uploads": len(puts),
        "acknowledged": len(load.acknowledged),
        "uploads_retried_by_client": sum(c.retries > 0 for c in puts),
        "client_retries": sum(c.retries for c in puts),
        "acknowledged_lost": len(lost), "unacknowledged_visible": len(unacknowledged),
        "orphans_swept": len(keys - referenced), "sweep": swept,
        "kill_cycle_s_mean": round((kills[-1].died - kills[0].started) / len(kills), 2),
        "replay_events": replays, "audit_events": events, "per_kill": per_kill,
    }))  # fmt: skip
