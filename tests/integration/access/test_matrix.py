"""Every cell of the role x RPC matrix against a running server, on SQLite and PostgreSQL.

The expected outcomes come from ``tests/unit/service/authz_matrix.EXPECTED`` (written by
hand, independently of deploy/policy.toml). Each role calls with a certificate whose OU
names the role. "patient" cells run twice: for a patient the caller holds a care-team
grant for (allowed) and for another patient (PERMISSION_DENIED). Every denial must leave
exactly one "denied" event in the audit trail.

PYTEST_DONT_REWRITE: failures name roles, methods and codes, never identifiers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from pydicom.uid import generate_uid

from service._gen.medvault.v1 import access_pb2 as apb
from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import records_pb2 as pb
from service.authz.permissions import RPC_PERMISSIONS
from tests import content
from tests.fixtures.service import RunningService
from tests.integration.access.helpers import (
    TIMEOUT,
    Client,
    client,
    code_of,
    events,
    fetch,
    grant,
    new_patient,
    put_record,
)
from tests.unit.service.authz_matrix import ALLOW, DENY, EXPECTED, PATIENT, ROLES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CLINICAL = ("physician", "nurse", "radiologist")
CONTENT = b"synthetic matrix note"
FAKE_GRANT = "0" * 32
# What an allowed call may answer to a dummy request: it passed authorization.
ALLOWED_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
}
PD = grpc.StatusCode.PERMISSION_DENIED


@dataclass
class Target:
    """The data a call is about: a patient and one record of that patient."""

    patient: pb.PatientId
    record: pb.Record
    study_uid: str = ""  # of the patient's one DICOM instance


@dataclass
class World:
    service: RunningService
    clients: dict[str, Client]  # role -> client "<role>-1"
    clerk: Client
    officer: Client
    own: dict[str, Target]  # clinical role -> patient it holds a grant for
    other: Target  # nobody in the matrix holds a grant for this patient
    issue: Callable[[str, str | None], Any]


@pytest.fixture(scope="module")
def world(service_factory: Any, fresh_database: str, issue: Any) -> Iterator[World]:
    service: RunningService = service_factory(fresh_database)
    clients = {role: client(service, issue(f"{role}-1", role), role) for role in ROLES}
    clerk = client(service, issue("clerk-setup", "records_clerk"))
    officer = client(service, issue("officer-check", "security_officer"))
    own: dict[str, Target] = {}
    for role in CLINICAL:
        patient = new_patient()
        own[role] = Target(patient, put_record(clerk, patient, CONTENT), _study(clerk, patient))
        grant(clerk, patient, f"{role}-1")
    other_patient = new_patient()
    other = Target(other_patient, put_record(clerk, other_patient, CONTENT),
                   _study(clerk, other_patient))
    yield World(service, clients, clerk, officer, own, other, issue)
    for c in (*clients.values(), clerk, officer):
        c.close()
    service.stop()


def _study(clerk: Client, patient: pb.PatientId) -> str:
    """Store one DICOM instance of a new study for ``patient``; its study UID."""
    uid = generate_uid()
    head = pb.RecordHeader(patient=patient, kind=pb.RECORD_KIND_DICOM,
                           content_type="application/dicom")
    data = content.dicom(patient.id, patient.assigning_authority, StudyInstanceUID=uid)
    clerk.records.PutRecord(
        iter([pb.PutRecordRequest(header=head), pb.PutRecordRequest(chunk=data)]),
        timeout=TIMEOUT,
    )
    return str(uid)


def call(c: Client, method: str, target: Target) -> grpc.StatusCode:  # noqa: C901
    """Call ``method`` with a minimal valid request about ``target``."""
    name = method.rsplit("/", 1)[1]
    t = TIMEOUT
    match name:
        case "PutRecord":
            try:
                put_record(c, target.patient, b"synthetic addendum")
            except grpc.RpcError as e:
                return e.code()
            return grpc.StatusCode.OK
        case "GetRecord":
            fetched = fetch(c, target.record.id)
            if fetched.error is not None:
                assert fetched.metadata is None, f"{name}: metadata sent on error"
                assert not fetched.content, f"{name}: content sent on error"
            else:
                assert fetched.content == CONTENT, f"{name}: content differs"
            return fetched.code
        case "StatRecord":
            return code_of(
                c.records.StatRecord, pb.StatRecordRequest(id=target.record.id), timeout=t
            )
        case "ListRecords":
            return code_of(
                c.records.ListRecords, pb.ListRecordsRequest(patient=target.patient), timeout=t
            )
        case "ListStudies":
            return code_of(
                c.records.ListStudies, pb.ListStudiesRequest(patient=target.patient), timeout=t
            )
        case "GetStudy":
            return code_of(
                c.records.GetStudy, pb.GetStudyRequest(study_uid=target.study_uid), timeout=t
            )
        case "GrantAccess":
            request = apb.GrantAccessRequest(patient=new_patient(), principal="nobody-matrix")
            return code_of(c.access.GrantAccess, request, timeout=t)
        case "RevokeAccess":
            return code_of(
                c.access.RevokeAccess, apb.RevokeAccessRequest(grant_id=FAKE_GRANT), timeout=t
            )
        case "ListGrants":
            return code_of(
                c.access.ListGrants, apb.ListGrantsRequest(principal="nobody-matrix"), timeout=t
            )
        case "BreakGlass":
            request = apb.BreakGlassRequest(
                patient=new_patient(), reason="matrix test", duration_seconds=60
            )
            return code_of(c.access.BreakGlass, request, timeout=t)
        case "WhoAmI":
            return code_of(c.access.WhoAmI, apb.WhoAmIRequest(), timeout=t)
        case "QueryEvents":
            return code_of(c.audit.QueryEvents, aupb.QueryEventsRequest(limit=1), timeout=t)
        case "VerifyChain":
            return code_of(c.audit.VerifyChain, aupb.VerifyChainRequest(), timeout=t)
        case "ExportEvents":
            request = aupb.ExportEventsRequest(
                query=aupb.QueryEventsRequest(limit=1), format=aupb.EXPORT_FORMAT_JSONL
            )
            return code_of(c.audit.ExportEvents, request, timeout=t)
        case "ListBreakGlass":
            return code_of(c.audit.ListBreakGlass, aupb.ListBreakGlassRequest(), timeout=t)
        case "ReviewBreakGlass":
            request = aupb.ReviewBreakGlassRequest(grant_id=FAKE_GRANT, comment="matrix")
            return code_of(c.audit.ReviewBreakGlass, request, timeout=t)
    raise AssertionError(f"no request for {method}")


# The services this module exercises; others (signing, keys) have their own tests.
SERVICES = ("medvault.v1.RecordService", "medvault.v1.AccessService", "medvault.v1.AuditService")


def _covered(method: str) -> bool:
    return method.lstrip("/").partition("/")[0] in SERVICES


def test_matrix_covers_every_rpc() -> None:
    rpcs = {m for m in RPC_PERMISSIONS if _covered(m)}
    for role in ROLES:
        rows = {m for m in EXPECTED[role] if _covered(m)}
        assert rows == rpcs, f"matrix rows differ from the RPC table for {role}"


@pytest.mark.parametrize("role", ROLES)
def test_role_matrix(world: World, role: str) -> None:  # noqa: C901
    c = world.clients[role]
    own = world.own.get(role, world.other)
    failures: list[str] = []
    role_denials: list[str] = []  # methods denied by role
    patient_denials: list[str] = []  # methods denied for the other patient
    for method, expected in EXPECTED[role].items():
        if not _covered(method):
            continue
        if expected == DENY:
            got = call(c, method, own)
            role_denials.append(method)
            if got != PD:
                failures.append(f"{method}: expected PERMISSION_DENIED, got {got.name}")
        elif expected == ALLOW:
            got = call(c, method, own)
            if got not in ALLOWED_CODES:
                failures.append(f"{method}: expected allowed, got {got.name}")
        else:
            assert expected == PATIENT
            got = call(c, method, world.own[role])
            if got != grpc.StatusCode.OK:
                failures.append(f"{method} own patient: expected OK, got {got.name}")
            got = call(c, method, world.other)
            patient_denials.append(method)
            if got != PD:
                failures.append(
                    f"{method} other patient: expected PERMISSION_DENIED, got {got.name}"
                )
    assert not failures, f"{role}: " + "; ".join(failures)

    # Every denied cell is exactly one "denied" event of this principal.
    denied = events(world.officer, principal=f"{role}-1", outcome=aupb.OUTCOME_DENIED)
    problems: list[str] = []
    if len(denied) != len(role_denials) + len(patient_denials):
        problems.append(
            f"{len(denied)} denied events for "
            f"{len(role_denials) + len(patient_denials)} denied calls"
        )
    for method in role_denials:
        matching = [e for e in denied if e.resource == method]
        if len(matching) != 1:
            problems.append(f"{method}: {len(matching)} denied events")
            continue
        e = matching[0]
        if e.action != RPC_PERMISSIONS[method] or e.status != "PERMISSION_DENIED":
            problems.append(f"{method}: denied event has action {e.action} status {e.status}")
        if not e.source.startswith("ipv4:127.0.0.1:") or e.role != role:
            problems.append(f"{method}: denied event source or role wrong")
    if patient_denials:
        about_other = events(
            world.officer,
            principal=f"{role}-1",
            outcome=aupb.OUTCOME_DENIED,
            patient=world.other.patient,
        )
        actions = sorted(e.action for e in about_other)
        wanted = sorted(RPC_PERMISSIONS[m] for m in patient_denials)
        if actions != wanted:
            problems.append(f"patient denials audited as {actions}, expected {wanted}")
        if any(e.status != "PERMISSION_DENIED" or not e.patient_index for e in about_other):
            problems.append("patient denial event without status or patient index")
    assert not problems, f"{role}: " + "; ".join(problems)


def test_security_officer_and_backup_operator_never_read_content(world: World) -> None:
    record = world.other.record
    for role in ("security_officer", "backup_operator"):
        c = world.clients[role]
        fetched = fetch(c, record.id)
        assert fetched.code == PD, f"{role} GetRecord: {fetched.code.name}"
        assert fetched.metadata is None, f"{role} received metadata"
        assert not fetched.content, f"{role} received content"
        for name, request in (
            ("StatRecord", pb.StatRecordRequest(id=record.id)),
            ("ListRecords", pb.ListRecordsRequest(patient=world.other.patient)),
        ):
            got = code_of(getattr(c.records, name), request, timeout=TIMEOUT)
            assert got == PD, f"{role} {name}: {got.name}"
    # Not even with a care-team grant: the role lacks the permission itself.
    grant(world.clerk, world.other.patient, "backup_operator-1")
    got = fetch(world.clients["backup_operator"], record.id)
    assert got.code == PD, f"backup operator with a grant: {got.code.name}"
    assert got.metadata is None, "backup operator received metadata"
    assert not got.content, "backup operator received content"


def test_break_the_glass_is_reviewed_once(world: World) -> None:
    doctor = client(world.service, world.issue("physician-bg", "physician"))
    patient = new_patient()
    record = put_record(world.clerk, patient, CONTENT)
    assert fetch(doctor, record.id).code == PD, "read without a grant"

    # A reason is mandatory.
    no_reason = code_of(
        doctor.access.BreakGlass, apb.BreakGlassRequest(patient=patient), timeout=TIMEOUT
    )
    assert no_reason == grpc.StatusCode.INVALID_ARGUMENT, f"no reason: {no_reason.name}"
    assert fetch(doctor, record.id).code == PD, "break-the-glass without reason opened access"

    opened = doctor.access.BreakGlass(
        apb.BreakGlassRequest(patient=patient, reason="unconscious patient in ED (test)"),
        timeout=TIMEOUT,
    )
    assert opened.break_glass, "not a break-the-glass grant"
    assert opened.expires_at.seconds > 0, "not time-limited"
    fetched = fetch(doctor, record.id)
    assert fetched.code == grpc.StatusCode.OK, f"read failed: {fetched.code.name}"
    assert fetched.content == CONTENT, "content differs"

    # The read's event names the break-the-glass grant.
    reads = events(
        world.officer, principal="physician-bg", action="records.read", outcome=aupb.OUTCOME_ALLOWED
    )
    assert len(reads) == 1, f"{len(reads)} read events"
    assert opened.id in reads[0].reason, "read not flagged as break-the-glass"

    queue = world.officer.audit.ListBreakGlass(aupb.ListBreakGlassRequest(), timeout=TIMEOUT)
    items = [i for i in queue.items if i.grant_id == opened.id]
    assert len(items) == 1, "break-the-glass not queued for review"
    assert not items[0].reviewed, "queued as reviewed already"
    assert items[0].event.principal == "physician-bg", "queue item names another principal"

    reviewed = world.officer.audit.ReviewBreakGlass(
        aupb.ReviewBreakGlassRequest(grant_id=opened.id, comment="checked with ED (test)"),
        timeout=TIMEOUT,
    )
    assert reviewed.reviewed, "not marked reviewed"
    assert reviewed.reviewed_by == "officer-check", "reviewer not named"
    assert reviewed.comment == "checked with ED (test)", "comment not kept"
    pending = world.officer.audit.ListBreakGlass(aupb.ListBreakGlassRequest(), timeout=TIMEOUT)
    assert opened.id not in {i.grant_id for i in pending.items}, "reviewed item still pending"
    everything = world.officer.audit.ListBreakGlass(
        aupb.ListBreakGlassRequest(include_reviewed=True), timeout=TIMEOUT
    )
    assert opened.id in {i.grant_id for i in everything.items if i.reviewed}, "reviewed missing"

    again = code_of(
        world.officer.audit.ReviewBreakGlass,
        aupb.ReviewBreakGlassRequest(grant_id=opened.id, comment="again"),
        timeout=TIMEOUT,
    )
    assert again == grpc.StatusCode.FAILED_PRECONDITION, f"second review: {again.name}"

    # The review itself is audited; its comment stays with the grant, out of the immutable
    # trail (free text may name the patient).
    reviews = events(
        world.officer,
        principal="officer-check",
        action="audit.review",
        outcome=aupb.OUTCOME_ALLOWED,
    )
    assert any(
        e.resource == f"grant/{opened.id}" and e.reason == "reviewed" for e in reviews
    ), "review not audited"
    assert not any("checked with ED" in e.reason for e in reviews), "comment copied into the trail"
    queue = world.officer.audit.ListBreakGlass(
        aupb.ListBreakGlassRequest(include_reviewed=True), timeout=TIMEOUT
    )
    assert any(i.comment == "checked with ED (test)" for i in queue.items), "comment lost"
    doctor.close()
