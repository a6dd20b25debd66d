"""A database writer without the token cannot make medvault serve a row it edited.

Issue 8, item 3. Each test edits one column of a record's metadata row with raw SQL
(as someone with write access to the database, but not to the token, could) and checks
that GetRecord, StatRecord and ListRecords refuse it with DATA_LOSS and release nothing,
that the refused read has its audit event naming the record, and that an incident is
raised. A record re-pointed to a patient the physician is granted is not served; a
legacy (v1 sealed) row still reads, is checked for its patient, and the rewrap upgrades
it to v2.

PYTEST_DONT_REWRITE: failures name columns, codes and counts only.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from keystore import Pkcs11KeyWrapper, Pkcs11SessionPool
from keystore.interfaces import WrappedKey
from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import keys_pb2 as kpb
from service._gen.medvault.v1 import keys_pb2_grpc as kpb_grpc
from service._gen.medvault.v1 import records_pb2 as pb
from storage.row_auth import associated_data
from storage.sealing import META_V1, META_V2, SealedFields, seal, unseal
from storage.sql_metadata import from_db_time, records
from tests.fixtures.service import RunningService
from tests.integration.access.helpers import (
    TIMEOUT,
    Client,
    client,
    code_of,
    engine_for,
    events,
    fetch,
    grant,
    new_patient,
    put_record,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DOCTOR = "physician-rows"
CONTENT = b"synthetic row-binding note " * 40


@dataclass
class World:
    service: RunningService
    engine: sa.Engine
    clerk: Client
    doctor: Client
    officer: Client
    keys: kpb_grpc.KeyServiceStub
    pool: Pkcs11SessionPool

    def new_granted(self) -> tuple[pb.PatientId, pb.Record]:
        """A patient the physician is granted, with one record."""
        patient = new_patient()
        record = put_record(self.clerk, patient, CONTENT)
        grant(self.clerk, patient, DOCTOR)
        return patient, record

    def row(self, record_id: str) -> Any:
        with self.engine.connect() as c:
            return c.execute(sa.select(records).where(records.c.id == record_id)).one()

    def edit(self, record_id: str, **values: object) -> None:
        with self.engine.begin() as c:
            c.execute(records.update().where(records.c.id == record_id).values(**values))


@pytest.fixture(scope="module")
def world(
    service_factory: Any, fresh_database: str, issue: Any, keystore_pool: Pkcs11SessionPool
) -> Iterator[World]:
    service: RunningService = service_factory(fresh_database)
    clerk = client(service, issue("clerk-rows", "records_clerk"))
    doctor = client(service, issue(DOCTOR, "physician"))
    officer = client(service, issue("officer-rows", "security_officer"))
    admin = client(service, issue("keyadmin-rows", "key_admin"))
    engine = engine_for(fresh_database)
    yield World(
        service,
        engine,
        clerk,
        doctor,
        officer,
        kpb_grpc.KeyServiceStub(admin.channel),
        keystore_pool,
    )
    for c in (clerk, doctor, officer, admin):
        c.close()
    engine.dispose()
    service.stop()


def _stat(w: World, record_id: str) -> grpc.StatusCode:
    return code_of(w.doctor.records.StatRecord, pb.StatRecordRequest(id=record_id), timeout=TIMEOUT)


def _list(w: World, patient: pb.PatientId) -> tuple[grpc.StatusCode, list[str]]:
    try:
        reply = w.doctor.records.ListRecords(
            pb.ListRecordsRequest(patient=patient), timeout=TIMEOUT
        )
    except grpc.RpcError as e:
        return e.code(), []
    return grpc.StatusCode.OK, [r.id for r in reply.records]


def _refused_events(w: World, record_id: str) -> list[aupb.AuditEvent]:
    return [
        e
        for e in events(w.officer, principal=DOCTOR, outcome=aupb.OUTCOME_FAILED)
        if e.resource.startswith(f"record/{record_id}") and e.status == "DATA_LOSS"
    ]


def _incidents(w: World, record_id: str) -> list[aupb.AuditEvent]:
    return [
        e
        for e in events(w.officer, action="incident")
        if e.status == "row-tampered" and e.resource.startswith(f"record/{record_id}/")
    ]


def _expect_refused(w: World, record_id: str, listed_under: pb.PatientId) -> None:
    """Get, Stat and List are DATA_LOSS, nothing is released, each refusal is audited
    under the record, and one incident names it."""
    fetched = fetch(w.doctor, record_id)
    assert fetched.code == grpc.StatusCode.DATA_LOSS, f"GetRecord {fetched.code.name}"
    assert fetched.metadata is None, "GetRecord released metadata"
    assert fetched.content == b"", "GetRecord released content"
    assert _stat(w, record_id) == grpc.StatusCode.DATA_LOSS, "StatRecord not DATA_LOSS"
    code, _ = _list(w, listed_under)
    assert code == grpc.StatusCode.DATA_LOSS, f"ListRecords {code.name}"
    refused = _refused_events(w, record_id)
    assert len(refused) == 3, f"{len(refused)} refused-read events name the record"
    assert {e.action for e in refused} == {"records.read", "records.stat", "records.list"}, (
        "a refused read has no event of its own"
    )
    assert len(_incidents(w, record_id)) == 1, "no single row-tampered incident"


def _another_index(w: World) -> bytes:
    _, other = w.new_granted()
    return bytes(w.row(other.id).patient_index)


def _another_sealed(w: World) -> bytes:
    _, other = w.new_granted()
    return bytes(w.row(other.id).sealed_meta)


def _flip_last(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 1])


# column: new value from (world, current row). Every column a read or list trusts.
EDITS: dict[str, Callable[[World, Any], object]] = {
    "patient_index": lambda w, row: None,  # set by the test: it lists under that patient
    "kind": lambda w, row: "PDF",
    "content_type": lambda w, row: "text/plain",
    "size": lambda w, row: row.size + 1,
    "stored_size": lambda w, row: row.stored_size + 16,
    "created_by": lambda w, row: "someone-else",
    "created_at": lambda w, row: from_db_time(row.created_at) - timedelta(days=3),
    "ciphertext_sha256": lambda w, row: bytes(32),
    "supersedes_version": lambda w, row: 1,
    "segment_size": lambda w, row: row.segment_size * 2,
    "object_key": lambda w, row: "objects/" + secrets.token_hex(16),
    "version": lambda w, row: 2,
    "sealed_meta": lambda w, row: _another_sealed(w),
    "wrapped_dek": lambda w, row: _flip_last(bytes(row.wrapped_dek)),
}


@pytest.mark.parametrize("column", list(EDITS))
def test_each_row_column_edit_is_refused(world: World, column: str) -> None:
    patient, record = world.new_granted()
    assert fetch(world.doctor, record.id).code == grpc.StatusCode.OK, "read before the edit"
    listed_under = patient
    if column == "patient_index":  # re-pointed: it is listed under the patient it names
        listed_under, other = world.new_granted()
        new_value: object = bytes(world.row(other.id).patient_index)
    else:
        new_value = EDITS[column](world, world.row(record.id))
    world.edit(record.id, **{column: new_value})
    _expect_refused(world, record.id, listed_under)


def test_record_repointed_to_a_granted_patient_is_not_served(world: World) -> None:
    """The attack of issue 8: the physician may see patient G, not patient P."""
    victim = new_patient()
    record = put_record(world.clerk, victim, CONTENT)  # no grant for the physician
    assert fetch(world.doctor, record.id).code == grpc.StatusCode.PERMISSION_DENIED, "granted?"
    granted, own = world.new_granted()
    world.edit(record.id, patient_index=bytes(world.row(own.id).patient_index))

    fetched = fetch(world.doctor, record.id)
    assert fetched.code == grpc.StatusCode.DATA_LOSS, f"GetRecord {fetched.code.name}"
    assert fetched.metadata is None, "another patient's record served"
    assert fetched.content == b"", "another patient's record served"
    code, ids = _list(world, granted)
    assert code == grpc.StatusCode.DATA_LOSS, f"ListRecords {code.name}"
    assert record.id not in ids, "listed as the granted patient's"
    allowed = [
        e
        for e in events(world.officer, principal=DOCTOR, outcome=aupb.OUTCOME_ALLOWED)
        if e.resource.startswith(f"record/{record.id}")
    ]
    assert not allowed, "an allowed read of the re-pointed record was audited"
    assert len(_incidents(world, record.id)) == 1, "no incident"
    assert fetch(world.doctor, own.id).code == grpc.StatusCode.OK, "the granted record broke"


def _make_legacy(w: World, record_id: str) -> None:
    """Re-seal the row's metadata as a record written before v2 had it (v1 layout)."""
    row = w.row(record_id)
    ad = associated_data(row.id, row.version)
    dek = Pkcs11KeyWrapper(w.pool).unwrap(WrappedKey(row.kek_version, bytes(row.wrapped_dek)), ad)
    current = unseal(dek, ad, bytes(row.sealed_meta))
    legacy = seal(dek, ad, SealedFields(current.patient, current.title, current.sha256))
    assert legacy[:1] == META_V1, "not a v1 blob"
    w.edit(record_id, sealed_meta=legacy)


def test_legacy_row_reads_is_checked_for_its_patient_and_is_upgraded(world: World) -> None:
    patient, record = world.new_granted()
    _make_legacy(world, record.id)
    fetched = fetch(world.doctor, record.id)
    assert fetched.code == grpc.StatusCode.OK, f"legacy GetRecord {fetched.code.name}"
    assert fetched.content == CONTENT, "legacy content differs"
    assert _stat(world, record.id) == grpc.StatusCode.OK, "legacy StatRecord"
    code, ids = _list(world, patient)
    assert code == grpc.StatusCode.OK, f"legacy ListRecords {code.name}"
    assert ids == [record.id], "legacy ListRecords lists other records"

    # Its patient is checked even in v1 (the sealed patient's index is recomputed).
    original = bytes(world.row(record.id).patient_index)
    world.edit(record.id, patient_index=_another_index(world))
    assert fetch(world.doctor, record.id).code == grpc.StatusCode.DATA_LOSS, "legacy re-point"
    world.edit(record.id, patient_index=original)

    # The rewrap's last phase seals every column (v2); an edit is then detected.
    progress = list(world.keys.Rewrap(kpb.RewrapRequest(), timeout=120))
    assert progress, "rewrap sent no progress"
    assert bytes(world.row(record.id).sealed_meta)[:1] == META_V2, "not upgraded to v2"
    assert fetch(world.doctor, record.id).content == CONTENT, "upgraded record unreadable"
    world.edit(record.id, content_type="text/plain")
    assert fetch(world.doctor, record.id).code == grpc.StatusCode.DATA_LOSS, "edit after upgrade"


def test_tampered_legacy_row_is_not_upgraded(world: World) -> None:
    """The upgrade checks what the content proves: a v1 row whose size was edited stays
    v1 (and is reported failed) instead of having the edit sealed."""
    _, record = world.new_granted()
    _make_legacy(world, record.id)
    world.edit(record.id, size=world.row(record.id).size - 1)
    list(world.keys.Rewrap(kpb.RewrapRequest(), timeout=120))
    assert bytes(world.row(record.id).sealed_meta)[:1] == META_V1, "tampered row was resealed"
    ends = [
        e
        for e in events(world.officer, action="keys.manage")
        if "legacy records resealed" in e.reason
    ]
    assert ends, "no closing rewrap event"
    assert "0 failed" not in ends[-1].reason, "the failed upgrade is not reported"


def test_paging_never_skips_verification(world: World) -> None:
    """Rows on every page are verified: a tampered row on page 2 fails that page."""
    patient = new_patient()
    ids = [put_record(world.clerk, patient, CONTENT).id for _ in range(3)]
    grant(world.clerk, patient, DOCTOR)
    world.edit(ids[0], created_by="someone-else")  # the oldest: on the last page
    first = world.doctor.records.ListRecords(
        pb.ListRecordsRequest(patient=patient, page_size=2), timeout=TIMEOUT
    )
    assert len(first.records) == 2, "first page"
    assert first.next_page_token, "no second page"
    code = code_of(
        world.doctor.records.ListRecords,
        pb.ListRecordsRequest(patient=patient, page_size=2, page_token=first.next_page_token),
        timeout=TIMEOUT,
    )
    assert code == grpc.StatusCode.DATA_LOSS, f"second page {code.name}"
    wait_for(lambda: len(_incidents(world, ids[0])) == 1, what="the incident")


@pytest.fixture(scope="module")
def strict_world(
    service_factory: Any,
    fresh_database: str,
    issue: Any,
    keystore_pool: Pkcs11SessionPool,
    world: World,
) -> Iterator[World]:
    """A second server on the same database with ``accept_legacy_sealed_rows = false``."""
    service: RunningService = service_factory(fresh_database, accept_legacy_sealed_rows=False)
    clerk = client(service, issue("clerk-rows", "records_clerk"))
    doctor = client(service, issue(DOCTOR, "physician"))
    officer = client(service, issue("officer-rows", "security_officer"))
    admin = client(service, issue("keyadmin-rows", "key_admin"))
    yield World(
        service, world.engine, clerk, doctor, officer,
        kpb_grpc.KeyServiceStub(admin.channel), keystore_pool,
    )  # fmt: skip
    for c in (clerk, doctor, officer, admin):
        c.close()
    service.stop()


def test_legacy_rows_refused_once_the_switch_is_off(strict_world: World) -> None:
    """With ``[server] accept_legacy_sealed_rows = false`` a v1 row (e.g. an older blob a
    database writer put back, to edit columns v1 does not bind) is DATA_LOSS, audited
    under the record and raised as an incident; v2 rows read as before."""
    w = strict_world
    patient, record = w.new_granted()
    assert fetch(w.doctor, record.id).content == CONTENT, "a v2 row is refused"
    _make_legacy(w, record.id)
    _expect_refused(w, record.id, patient)
    # The rewrap cannot upgrade it either: it does not verify here any more.
    list(w.keys.Rewrap(kpb.RewrapRequest(), timeout=120))
    assert bytes(w.row(record.id).sealed_meta)[:1] == META_V1, "refused row was resealed"
