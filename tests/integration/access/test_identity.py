"""Identity attacks against a real server, on SQLite and PostgreSQL.

A revoked client certificate (CRL re-read on SIGHUP), certificate names that could
forge an identity, a principal reviewing their own break-the-glass, and a grant row
forged in the database: each refused, and each refusal in the audit trail.
"""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from cryptography import x509

from service._gen.medvault.v1 import access_pb2 as apb
from service._gen.medvault.v1 import audit_pb2 as aupb
from service.audit_servicer import SELF_REVIEW
from service.localstack.ca import DevCA
from storage.grants import access_grants
from tests.fixtures.service import DEFAULT_POLICY, TEST_POLICY_EXTRA, RunningService, TlsFiles
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
    verify,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

POLICY_EXTRA = """
[principals."dr-officer"]
roles = ["physician", "security_officer"]
"""


@dataclass
class World:
    service: RunningService
    database: str
    crl: Path
    ca: DevCA
    officer: Client
    clerk: Client
    issue: Any


@pytest.fixture(scope="module")
def world(
    service_factory: Any, fresh_database: str, issue: Any, tls_files: TlsFiles, certs_dir: Path
) -> Iterator[World]:
    ca = DevCA.load_or_create(tls_files.ca.parent)
    crl = ca.issue_crl(certs_dir / "clients.crl")
    tls = {"enabled": True, "cert": tls_files.server_cert, "key": tls_files.server_key,
           "client_ca": tls_files.ca, "crl": crl}  # fmt: skip
    service: RunningService = service_factory(
        fresh_database,
        policy=DEFAULT_POLICY.read_text() + TEST_POLICY_EXTRA + POLICY_EXTRA,
        extra_sections={"tls": tls},
    )
    officer = client(service, issue("officer-identity", "security_officer"))
    clerk = client(service, issue("clerk-identity", "records_clerk"))
    yield World(service, fresh_database, crl, ca, officer, clerk, issue)
    officer.close()
    clerk.close()
    service.stop()


def _whoami(c: Client) -> grpc.StatusCode:
    return code_of(c.access.WhoAmI, apb.WhoAmIRequest(), timeout=TIMEOUT)


def _refusals(w: World, text: str) -> list[aupb.AuditEvent]:
    found = events(w.officer, principal="unauthenticated", outcome=aupb.OUTCOME_DENIED)
    return [e for e in found if text in e.reason]


def test_revoked_certificate_is_refused_after_sighup(world: World) -> None:
    victim_files = world.issue("crl-victim", "security_officer")
    victim, bystander = client(world.service, victim_files), client(
        world.service, world.issue("crl-bystander", "security_officer")
    )
    assert _whoami(victim) == grpc.StatusCode.OK
    serial = x509.load_pem_x509_certificate(victim_files[0].read_bytes()).serial_number
    world.ca.issue_crl(world.crl, [serial])
    assert _whoami(victim) == grpc.StatusCode.OK, "revoked before the reload"
    os.kill(world.service.process.pid, signal.SIGHUP)
    wait_for(
        lambda: _whoami(victim) == grpc.StatusCode.UNAUTHENTICATED, what="CRL reload on SIGHUP"
    )
    assert _whoami(bystander) == grpc.StatusCode.OK, "a certificate not revoked was refused"
    assert _refusals(world, "client certificate is revoked"), "revocation refusal not audited"
    victim.close()
    bystander.close()


@pytest.mark.parametrize(
    "name", ["dr-lan via his-app", "dr-lan\tforged"], ids=["via", "control-character"]
)
def test_names_that_could_forge_an_identity_are_refused(world: World, name: str) -> None:
    hostile = client(world.service, world.issue(name, "security_officer"))
    assert _whoami(hostile) == grpc.StatusCode.UNAUTHENTICATED
    hostile.close()
    refusals = _refusals(world, "client certificate common name")
    assert refusals, "refusal not audited"
    assert all(name not in e.reason for e in refusals), "the bad name was copied into the trail"
    assert verify(world.officer).ok, "the trail does not verify after the refusal"


def test_principal_cannot_review_own_break_the_glass(world: World) -> None:
    dr = client(world.service, world.issue("dr-officer"))
    opened = dr.access.BreakGlass(
        apb.BreakGlassRequest(patient=new_patient(), reason="synthetic emergency (test)"),
        timeout=TIMEOUT,
    )
    own = code_of(
        dr.audit.ReviewBreakGlass,
        aupb.ReviewBreakGlassRequest(grant_id=opened.id, comment="fine by me"),
        timeout=TIMEOUT,
    )
    assert own == grpc.StatusCode.PERMISSION_DENIED, f"self-review: {own.name}"
    denied = events(
        world.officer, principal="dr-officer", action="audit.review", outcome=aupb.OUTCOME_DENIED
    )
    assert any(e.reason == SELF_REVIEW for e in denied), "self-review refusal not audited"
    reviewed = world.officer.audit.ReviewBreakGlass(
        aupb.ReviewBreakGlassRequest(grant_id=opened.id, comment="checked (test)"),
        timeout=TIMEOUT,
    )
    assert reviewed.reviewed
    assert reviewed.comment == "checked (test)"
    assert reviewed.event.reason == "synthetic emergency (test)", "reason not opened for review"
    dr.close()


def test_forged_grant_row_grants_nothing(world: World) -> None:
    patient = new_patient()
    record = put_record(world.clerk, patient)
    real = grant(world.clerk, patient, "phys-real")
    forger = client(world.service, world.issue("phys-forger", "physician"))
    assert fetch(forger, record.id).code == grpc.StatusCode.PERMISSION_DENIED
    fake_id = secrets.token_hex(16)
    engine = engine_for(world.database)
    try:
        with engine.begin() as connection:
            row = connection.execute(
                sa.select(access_grants).where(access_grants.c.id == real.id)
            ).one()
            values = {**row._mapping, "id": fake_id, "principal": "phys-forger"}
            connection.execute(access_grants.insert().values(**values))
    finally:
        engine.dispose()
    assert fetch(forger, record.id).code == grpc.StatusCode.PERMISSION_DENIED, "forged row works"
    incidents = events(world.officer, action="incident")
    assert any(e.resource == f"grant/{fake_id}" for e in incidents), "forgery not reported"
    forger.close()
