"""Issue 10, found in a two-replica run: what only shows with two servers on one database.

Two real server processes (``service_factory``) share the metadata database
(PostgreSQL, or one SQLite file on this machine), the record bucket and the token:

* an idle replica's audit writer sleeps once the other replica signed the head (it
  used to spin at ~600 transactions/s, ~2/3 of a core);
* the orphan sweeper runs once per interval across both replicas, not once per replica;
* a PutRecord retried on the other replica with the same ``request_id`` returns the
  first result: one record, one row.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from tests.fixtures.service import RunningService
from tests.integration.access.conftest import new_database
from tests.integration.service.streams import new_patient

pytestmark = pytest.mark.integration
SWEEP_SECONDS = 1.0
CHECKPOINT_SECONDS = 2
TIMEOUT = 30


@pytest.fixture(scope="module")
def replica_database(
    request: pytest.FixtureRequest, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    yield from new_database(request, database_url, tmp_path_factory)


@pytest.fixture(scope="module")
def replicas(service_factory: Any, replica_database: str) -> tuple[RunningService, ...]:
    """Two replicas: one database, one bucket, one token; fast checkpoints and sweeps."""
    bucket = f"mv-{secrets.token_hex(6)}"
    options = {"orphan_sweep_seconds": SWEEP_SECONDS}
    audit = {"checkpoint_seconds": CHECKPOINT_SECONDS}
    first = service_factory(replica_database, bucket=bucket, audit=audit, **options)
    second = service_factory(replica_database, bucket=bucket, audit=audit, **options)
    return first, second


def put(service: RunningService, content: bytes, **header: Any) -> pb.Record:
    """Store ``content`` for a new synthetic patient (or ``header``'s) through ``service``."""
    header.setdefault("patient", new_patient())
    head = pb.RecordHeader(
        kind=pb.RECORD_KIND_OTHER, content_type="application/octet-stream", **header
    )
    with service.channel() as channel:
        stub = pb_grpc.RecordServiceStub(channel)
        messages = [pb.PutRecordRequest(header=head), pb.PutRecordRequest(chunk=content)]
        record: pb.Record = stub.PutRecord(iter(messages), timeout=TIMEOUT)
        return record


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` (and its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_replica_audit_writer_does_not_spin(replicas: tuple[RunningService, ...]) -> None:
    """The second replica has an unsigned event; the first signs it; neither then spins.

    Order: a put on the second replica (it signs at once: its last checkpoint is old),
    another there (unsigned, due in CHECKPOINT_SECONDS), then one on the first replica,
    which signs the head covering both. When the second's checkpoint falls due it finds
    nothing new to sign. Spinning costs ~2/3 of a core; idle is a few percent. The bound
    (a fifth of a core over the window) leaves room for a loaded 2-core machine.
    """
    first, second = replicas
    put(second, b"synthetic note one")
    put(second, b"synthetic note two")
    put(first, b"synthetic note three")
    time.sleep(CHECKPOINT_SECONDS + 0.5)  # the second replica's checkpoint falls due
    window = 3.0
    before = [_cpu_seconds(r.process.pid) for r in replicas]
    time.sleep(window)
    used = [_cpu_seconds(r.process.pid) - b for r, b in zip(replicas, before, strict=True)]
    assert max(used) < 0.2 * window, f"a replica used {max(used):.2f} s CPU in {window} s idle"


def _sweeps(service: RunningService) -> int:
    count = 0
    for line in service.log_path.read_text().splitlines():
        try:
            count += json.loads(line).get("msg") == "orphan sweep"
        except ValueError:
            continue
    return count


def test_one_sweep_per_interval_across_replicas(replicas: tuple[RunningService, ...]) -> None:
    """Each replica wakes every interval; together they sweep about once per interval."""
    window = 8.0
    before = [_sweeps(r) for r in replicas]
    time.sleep(window)
    swept = sum(_sweeps(r) - b for r, b in zip(replicas, before, strict=True))
    rounds = window / SWEEP_SECONDS
    # One replica per interval: at most rounds + 1 (a boundary); per replica: ~2 * rounds.
    assert swept <= rounds + 2, f"{swept} sweeps in {rounds:.0f} intervals: one per replica"
    assert swept >= 2, f"only {swept} sweeps in {rounds:.0f} intervals"
