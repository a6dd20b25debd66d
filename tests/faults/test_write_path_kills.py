"""SIGKILL at each named point of the write path, over more than 200 uploads.

One server process per (point, round) on one database and bucket: it SIGKILLs itself
(``MEDVAULT_FAULT=sigkill:<point>:<n>``) the n-th time a put passes the point while four
clients put records; the next process starts on what it left. Then a clean server must
show every acknowledged put byte-identical, every listed record readable and matching its
digest, and a sweep with no grace must leave exactly the referenced objects; each row
has one write event and the audit chain verifies.

On SQLite: the same kills on PostgreSQL, over more than 200 uploads too, are
tests/faults/test_cluster.py's (a replica of the cluster topology, whose database is
PostgreSQL), so the pair covers both backends without running eleven cold starts twice.

PYTEST_DONT_REWRITE: failures name counts and keys, never content.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from storage.records import WRITE_FAULT_POINTS
from tests.faults.common import (
    Ledger,
    Seeds,
    expect_one_write_event_per_row,
    referenced_keys,
    run_clients,
    sweep,
)
from tests.fixtures.databases import new_database
from tests.fixtures.seaweed import S3Server
from tests.fixtures.service import RunningService, TlsFiles
from tests.fixtures.softhsm import SoftHsmToken
from tests.integration.access.helpers import client, issue_client, verify
from tests.integration.service.calls import expect_same_content, get, list_all, server_bucket
from tests.integration.service.streams import new_patient

pytestmark = [pytest.mark.integration, pytest.mark.backend("sqlite")]

Factory = Callable[..., RunningService]
ROUNDS = 2  # each round starts one server per point: ~3 s each
CLIENTS = 4


def _kill_at(round_: int, index: int) -> int:
    """The passage of the point that kills: varied so kills hit different moments."""
    return 18 + 4 * round_ + index % 2


@pytest.fixture
def own_database(
    request: pytest.FixtureRequest, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    yield from new_database(request, database_url, tmp_path_factory)


@pytest.mark.timeout(400)
def test_sigkill_at_each_write_point(
    service_factory: Factory, own_database: str, s3_server: S3Server,
    softhsm_token: SoftHsmToken, tls_files: TlsFiles, tmp_path: Path,
) -> None:
    patients = [new_patient() for _ in range(CLIENTS)]
    ledger = Ledger()
    seeds = Seeds(10_000)
    bucket = ""
    kills = 0
    restarts: list[float] = []
    for round_ in range(ROUNDS):
        for index, point in enumerate(WRITE_FAULT_POINTS):
            fault = f"sigkill:{point}:{_kill_at(round_, index)}"
            began = time.monotonic()
            service = service_factory(own_database, bucket=bucket, env={"MEDVAULT_FAULT": fault})
            restarts.append(time.monotonic() - began)
            bucket = server_bucket(service.config_path)
            run_clients(service, patients, seeds, lambda s=service: s.process.poll() is None,
                        ledger, stop_on_error=True)
            code = service.process.wait(timeout=60)
            assert code == -signal.SIGKILL, f"{fault}: server exited with {code}, not killed"
            kills += 1
    unexpected = {c: n for c, n in ledger.errors.items() if c != "UNAVAILABLE"}
    assert not unexpected, f"errors other than UNAVAILABLE: {unexpected}"

    service = service_factory(own_database, bucket=bucket)
    with service.channel() as channel:
        stub = pb_grpc.RecordServiceStub(channel)
        visible = [r for p in patients for r in list_all(stub, p, all_versions=True)]
        by_digest = {s.sha256(): s for s in ledger.attempted}
        for record in visible:  # every visible record reads back and matches its digest
            metadata, content = get(stub, record.id, record.version)
            sent = by_digest.get(metadata.sha256)
            assert sent is not None, f"record {record.id} holds content nobody sent"
            expect_same_content(content, sent.content())
        ids = {(r.id, r.version) for r in visible}
        lost = [key for key in ledger.acknowledged if key not in ids]
        assert not lost, f"{len(lost)} acknowledged puts lost: {lost[:3]}"
        for (record_id, version), sent in ledger.acknowledged.items():
            expect_same_content(get(stub, record_id, version)[1], sent.content())

    keys_before = {o.object_name for o in s3_server.client().list_objects(bucket, recursive=True)}
    referenced = referenced_keys(own_database)
    assert referenced <= keys_before, "a row references a missing object"
    swept = sweep(service, str(softhsm_token.conf_path))
    keys_after = {o.object_name for o in s3_server.client().list_objects(bucket, recursive=True)}
    assert keys_after == referenced, (
        f"{len(keys_after - referenced)} unreferenced objects left, "
        f"{len(referenced - keys_after)} referenced objects gone"
    )
    expect_one_write_event_per_row(own_database)
    officer = client(
        service, issue_client(tls_files, tmp_path, "fault-officer", "security_officer")
    )
    try:
        chain = verify(officer)
    finally:
        officer.close()
    assert chain.ok, f"audit chain: {chain.reason} at {chain.first_bad_sequence}"

    figures = {
        "backend": own_database.split(":", maxsplit=1)[0],
        "points": list(WRITE_FAULT_POINTS),
        "kills": kills,
        "puts_attempted": len(ledger.attempted),
        "puts_acknowledged": len(ledger.acknowledged),
        "puts_failed": sum(ledger.errors.values()),
        "visible_records": len(visible),
        "visible_unacknowledged": len(ids) - len(ledger.acknowledged),
        "acknowledged_lost": len(lost),
        "orphans_swept": len(keys_before - referenced),
        "sweep": swept.strip(),
        "audit_events_checked": chain.events_checked,
        "restart_seconds_max": round(max(restarts), 2),
        "restart_seconds_mean": round(sum(restarts) / len(restarts), 2),
    }
    print(json.dumps(figures))
    assert len(ledger.attempted) >= 200, f"only {len(ledger.attempted)} uploads"

