"""Attack: poison the audit batch so that other callers' reads fail (issue 8, item 2).

Hostile callers send what their own events cannot store as it is: a 300-character
record id, ids with NUL (refused by PostgreSQL), terminal escapes, bidirectional
overrides and newlines, a certificate whose CN is 300 characters, and one whose roles
overflow the role column. While they do, legitimate callers read a record at least
500 times. Every legitimate read must succeed, each with its allowed event; each
hostile call gets its own error and leaves its own (normalised) event; the chain
still verifies. Bounded in seconds: ~600 small reads.

PYTEST_DONT_REWRITE: failures name codes and counts only.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import records_pb2 as pb
from service.localstack.ca import ORGANIZATION, DevCA, IssuedCert
from tests.fixtures.service import RunningService, TlsFiles
from tests.integration.access.helpers import (
    Client,
    client,
    events,
    fetch,
    new_patient,
    put_record,
    verify,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
LEGITIMATE_READS = 520
READERS = 8
CONTENT = b"synthetic poisoning-test note"
ROLES = ["physician", "radiologist", "nurse", "records_clerk", "security_officer",
         "backup_operator", "key_admin", "admin"]  # fmt: skip
HOSTILE_IDS = [
    "a" * 300,
    "ab\x00cd" + "0" * 27,
    "\x00" * 40,
    "\x1b[2J\x1b[31mforged\nline",
    "rec\u202eevil\u2028x",
    "\x7f\x85" * 150,
]


def _issue(tls: TlsFiles, directory: Path, stem: str, attrs: list[x509.NameAttribute]) -> Any:
    """A client certificate with any subject (CN length checks bypassed on purpose)."""
    ca = DevCA.load_or_create(tls.ca.parent)
    paths = IssuedCert(directory / f"client-{stem}.pem", directory / f"client-{stem}.key")
    name = x509.Name([*attrs, x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)])
    return ca._issue(paths, name, ExtendedKeyUsageOID.CLIENT_AUTH, [])


@dataclass
class World:
    service: RunningService
    reader: Client
    officer: Client
    hostile: list[Client]
    record: pb.Record


@pytest.fixture(scope="module")
def world(
    service_factory: Any, fresh_database: str, issue: Any, tls_files: TlsFiles, certs_dir: Path
) -> Iterator[World]:
    # The readers and one poisoner share the test-app certificate: lift its call share
    # (server.max_calls_per_principal) so that the edge's fairness limit, tested in
    # test_edge.py, does not stand between this test and the audit writer.
    service: RunningService = service_factory(
        fresh_database, max_calls_per_principal=32, max_calls_per_application=32
    )
    reader = Client("test-app", service.channel())
    officer = client(service, issue("officer-poison", "security_officer"))
    long_cn = _issue(tls_files, certs_dir, "long-cn", [
        x509.NameAttribute(NameOID.COMMON_NAME, "x" * 300, _validate=False)
    ])  # fmt: skip
    many_roles = _issue(tls_files, certs_dir, "many-roles", [
        x509.NameAttribute(NameOID.COMMON_NAME, "many-roles"),
        *(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, r) for r in ROLES),
    ])  # fmt: skip
    hostile = [
        Client("hostile-id", service.channel()),
        client(service, (long_cn.cert, long_cn.key)),
        client(service, (many_roles.cert, many_roles.key)),
    ]
    record = put_record(reader, new_patient(), CONTENT)
    yield World(service, reader, officer, hostile, record)
    for c in (reader, officer, *hostile):
        c.close()
    service.stop()


def _poison(w: World, stop: threading.Event, codes: Counter[str]) -> None:
    """Hostile calls in a loop until the legitimate reads are done."""
    while not stop.is_set():
        for hostile_id in HOSTILE_IDS:
            codes["id:" + fetch(w.hostile[0], hostile_id).code.name] += 1
        for c in w.hostile[1:]:
            codes[f"{c.name or 'cert'}:" + fetch(c, w.record.id).code.name] += 1


def _read(w: World, channel: grpc.Channel, count: int) -> Counter[str]:
    c = Client("reader", channel)
    outcome: Counter[str] = Counter()
    for _ in range(count):
        got = fetch(c, w.record.id)
        ok = got.error is None and got.content == CONTENT
        outcome["ok" if ok else got.code.name] += 1
    return outcome


def _allowed_reads(w: World) -> int:
    return len(events(w.officer, principal="test-app", action="records.read",
                      outcome=aupb.OUTCOME_ALLOWED))  # fmt: skip


def test_poisoning_fails_no_legitimate_read(world: World) -> None:
    before = _allowed_reads(world)
    stop = threading.Event()
    hostile_codes: Counter[str] = Counter()
    poisoners = [threading.Thread(target=_poison, args=(world, stop, hostile_codes))
                 for _ in range(3)]  # fmt: skip
    channels = [world.service.channel() for _ in range(READERS)]
    for t in poisoners:
        t.start()
    try:
        with ThreadPoolExecutor(READERS) as pool:
            runs = pool.map(lambda ch: _read(world, ch, LEGITIMATE_READS // READERS), channels)
            outcome: Counter[str] = sum(runs, Counter())
    finally:
        stop.set()
        for t in poisoners:
            t.join()
        for ch in channels:
            ch.close()
    assert outcome == Counter(ok=LEGITIMATE_READS), f"legitimate reads: {dict(outcome)}"
    assert sum(hostile_codes.values()) >= 3 * len(HOSTILE_IDS), "too few hostile calls"
    assert not [k for k in hostile_codes if k.endswith((":OK", ":UNAVAILABLE", ":INTERNAL"))], (
        f"hostile calls: {dict(hostile_codes)}"
    )
    assert _allowed_reads(world) - before == LEGITIMATE_READS, "allowed events != reads"
    result = verify(world.officer)
    assert result.ok, f"chain broken: {result.reason}"


def test_hostile_calls_leave_their_own_normalised_events(world: World) -> None:
    for hostile_id in HOSTILE_IDS:
        assert fetch(world.hostile[0], hostile_id).code == grpc.StatusCode.INVALID_ARGUMENT
    # The edge refuses a malformed id before it reaches the store, and its event names
    # the call with a placeholder resource, never the caller's bytes.
    refused = [e for e in events(world.officer, principal="test-app", action="records.read")
               if e.status == "INVALID_ARGUMENT"]  # fmt: skip
    assert len(refused) >= len(HOSTILE_IDS), "hostile ids not audited"
    # (an id with a NUL is refused while the message is decoded: the resource is the RPC)
    placeholders = {"record/(invalid id)", "/medvault.v1.RecordService/GetRecord"}
    assert all(e.resource in placeholders for e in refused), "raw id in a resource"
    assert all(e.reason.startswith("id: ") for e in refused), "refusal does not name the field"
    assert all(ch not in e.resource + e.reason for e in refused for ch in "\x00\x1b\n\u202e")
    # A 300-character CN is refused at authentication; the presenting certificate's name
    # is kept, normalised to the column's width with a visible marker.
    unauthenticated = events(world.officer, principal="unauthenticated")
    assert any(e.application.startswith("x" * 200) and e.application.endswith("chars]")
               for e in unauthenticated), "long CN not audited"  # fmt: skip
    assert any(e.principal == "many-roles" and e.role.endswith("chars]") for e in events(
        world.officer, principal="many-roles")), "many-roles caller not audited"  # fmt: skip
