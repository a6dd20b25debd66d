"""What the security officer sees, and what nobody else does (issue 9, item 3).

The break-the-glass reason and the review comment are sealed at rest; the service opens
them for a caller holding ``audit.review`` only, in ``medvault audit review`` and
``medvault access list``, and audits that it did. Attacks: a clinician or clerk who may
list grants reads no sealed text through any field; a database writer who swaps a sealed
reason or a review is shown a marker (never the swapped text) and raises an incident.
The CLI runs as a subprocess with each person's own certificate.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from service._gen.medvault.v1 import access_pb2 as apb
from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import records_pb2 as pb
from service.audit_servicer import REPLACED
from service.cli.access_cmd import ALTERED
from storage.break_glass import TAMPERED_MARK
from storage.grants import ALTERED_MARK, REVIEW_ALTERED_MARK, access_grants
from tests.fixtures.service import DEFAULT_POLICY, ROOT, TEST_POLICY_EXTRA, RunningService
from tests.integration.access.conftest import is_sqlite
from tests.integration.access.helpers import (
    AUTHORITY,
    TIMEOUT,
    Client,
    client,
    engine_for,
    events,
    fetch,
    new_patient,
    put_record,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# A clinical role that may also list grants: the attacker of the "no new field" tests.
POLICY_EXTRA = """
[roles.ward_lead]
description = "Test only: a clinician who may list grants"
permissions = ["records.read", "access.list", "access.break_glass", "access.whoami"]
patient_scoped = true
"""
Cert = tuple[Path, Path]


@dataclass
class World:
    service: RunningService
    database: str
    certs: dict[str, Cert]
    officer: Client
    dr: Client
    clerk: Client
    ward: Client

    def command(self, who: str, *args: str) -> list[str]:
        cert, key = self.certs[who]
        return [sys.executable, "-m", "service", *args, "--endpoint", self.service.endpoint,
                "--ca", str(self.service.tls.ca), "--cert", str(cert), "--key", str(key)]

    def cli(self, who: str, *args: str) -> str:
        """Run ``medvault ARGS`` as ``who`` into a pipe; its stdout (exit 0 asserted)."""
        env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
        result = subprocess.run(
            self.command(who, *args), cwd=ROOT, env=env,
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-300:]}"
        assert "Traceback" not in result.stderr
        return result.stdout

    def cli_on_terminal(self, who: str, *args: str, columns: int) -> str:
        """Run ``medvault ARGS`` with stdout on a pseudo-terminal ``columns`` wide."""
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        with subprocess.Popen(
            self.command(who, *args), cwd=ROOT, env=env, stdout=slave, stderr=subprocess.PIPE
        ) as process:
            os.close(slave)
            output = bytearray()
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                output += data
            os.close(master)
            stderr = process.stderr.read() if process.stderr else b""
            assert process.wait(timeout=60) == 0, stderr.decode()[-300:]
        return output.decode().replace("\r\n", "\n")


@pytest.fixture(scope="module")
def world(service_factory: Any, fresh_database: str, issue: Any) -> Iterator[World]:
    service: RunningService = service_factory(
        fresh_database, policy=DEFAULT_POLICY.read_text() + TEST_POLICY_EXTRA + POLICY_EXTRA
    )
    certs = {
        "so-view": issue("so-view", "security_officer"),
        "dr-view": issue("dr-view", "physician"),
        "clerk-view": issue("clerk-view", "records_clerk"),
        "ward-view": issue("ward-view", "ward_lead"),
    }
    clients = {name: client(service, cert, name) for name, cert in certs.items()}
    yield World(service, fresh_database, certs, clients["so-view"], clients["dr-view"],
                clients["clerk-view"], clients["ward-view"])  # fmt: skip
    for c in clients.values():
        c.close()
    service.stop()


def _break_glass(w: World, patient: pb.PatientId, reason: str) -> apb.Grant:
    request = apb.BreakGlassRequest(patient=patient, reason=reason)
    grant: apb.Grant = w.dr.access.BreakGlass(request, timeout=TIMEOUT)
    return grant


def _review(w: World, grant_id: str, comment: str) -> None:
    request = aupb.ReviewBreakGlassRequest(grant_id=grant_id, comment=comment)
    w.officer.audit.ReviewBreakGlass(request, timeout=TIMEOUT)


def _row(output: str, grant_id: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(grant_id)]
    assert len(lines) == 1, f"{len(lines)} table rows name the grant"
    return lines[0]


def _cells(output: str, grant_id: str) -> dict[str, str]:
    """The row of ``grant_id`` as {header: cell}, cut at the header's column offsets."""
    header = output.splitlines()[0]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    row = _row(output, grant_id)
    bounds = [*starts[1:], None]
    return {n: row[s:e].strip() for n, s, e in zip(names, starts, bounds, strict=True)}


def _last_event(w: World, principal: str, resource: str) -> aupb.AuditEvent:
    found = [e for e in events(w.officer, principal=principal) if e.resource == resource]
    assert found, f"no event of {principal} on {resource}"
    return found[-1]


def _tampered(w: World, grant_id: str) -> bool:
    found = events(w.officer, action="incident")
    return any(e.resource == f"grant/{grant_id}" and e.status == "grant-tampered" for e in found)


def _swap(w: World, grant_id: str, donor_id: str, column: str) -> None:
    """The database writer's move: copy one sealed column from another grant's row."""
    engine = engine_for(w.database)
    try:
        with engine.begin() as connection:
            c = access_grants.c
            value = connection.execute(sa.select(c[column]).where(c.id == donor_id)).scalar_one()
            changed = connection.execute(
                access_grants.update().where(c.id == grant_id).values({column: value})
            ).rowcount
            assert changed == 1
    finally:
        engine.dispose()


def test_review_shows_reason_role_and_comment(world: World) -> None:
    grant = _break_glass(world, new_patient(), "synthetic: unconscious in ED (review test)")
    row = _cells(world.cli("so-view", "audit", "review"), grant.id)
    assert row["WHO"] == "dr-view"
    assert row["ROLE"] == "physician", "ROLE column not filled from the trail"
    assert row["REASON"] == "synthetic: unconscious in ED (review test)"
    assert row["REVIEWED"] == "no"
    assert row["PATIENT"] == grant.patient_index[:12]
    opened = _last_event(world, "so-view", "break-glass-queue")
    assert opened.action == "audit.review"
    assert opened.reason.startswith("sealed text shown: "), "reading sealed text not audited"
    assert "synthetic" not in opened.reason, "the trail holds the text itself"

    out = world.cli("so-view", "audit", "review", grant.id, "--comment", "synthetic: confirmed")
    assert out.startswith(f"grant {grant.id} reviewed by so-view at ")
    assert grant.id not in world.cli("so-view", "audit", "review")
    row = _cells(world.cli("so-view", "audit", "review", "--all"), grant.id)
    assert row["REVIEWED"].startswith("yes, so-view ")
    assert row["COMMENT"] == "synthetic: confirmed"
    assert row["ROLE"] == "physician"
    opened = _last_event(world, "so-view", "break-glass-queue")
    assert re.search(r"[1-9]\d* review comments?$", opened.reason), "comment reading unaudited"


def test_access_list_shows_patient_reason_and_review_to_the_officer(world: World) -> None:
    patient = new_patient()
    grant = _break_glass(world, patient, "synthetic: night admission (list test)")
    _review(world, grant.id, "synthetic: duty nurse confirmed")
    by_principal = world.cli("so-view", "access", "list", "--principal", "dr-view", "--all")
    row = _cells(by_principal, grant.id)
    assert row["PATIENT"] == grant.patient_index[:12], "patient is not the index prefix"
    assert "^" not in row["PATIENT"]
    assert row["REASON"] == "synthetic: night admission (list test)"
    assert row["REVIEW"] == "so-view: synthetic: duty nurse confirmed"
    assert row["KIND"] == "break-glass"
    event = _last_event(world, "so-view", "grants")
    assert event.action == "access.list"
    assert event.reason.startswith("sealed text shown: "), "listing sealed text not audited"

    by_patient = world.cli("so-view", "access", "list", "--patient", patient.id,
                           "--authority", AUTHORITY, "--all")  # fmt: skip
    row = _cells(by_patient, grant.id)
    assert row["PATIENT"] == f"{patient.id}^{AUTHORITY}", "the identifier asked is not echoed"
    assert row["REASON"] == "synthetic: night admission (list test)"


@pytest.mark.parametrize("who", ["ward-view", "clerk-view"])
def test_others_who_list_grants_read_no_sealed_text(world: World, who: str) -> None:
    """A clinician (or clerk) with access.list sees the grants, none of their text."""
    grant = _break_glass(world, new_patient(), f"synthetic: secret reason for {who}")
    _review(world, grant.id, f"synthetic: secret comment for {who}")
    lister = world.ward if who == "ward-view" else world.clerk
    request = apb.ListGrantsRequest(principal="dr-view", include_inactive=True)
    listed = {g.id: g for g in lister.access.ListGrants(request, timeout=TIMEOUT).grants}
    seen = listed[grant.id]
    assert (seen.reason, seen.review_comment, seen.reviewed_by) == ("", "", "")
    assert not seen.HasField("reviewed_at")
    assert not seen.altered
    assert seen.patient_index == grant.patient_index
    out = world.cli(who, "access", "list", "--principal", "dr-view", "--all")
    assert grant.id in out
    assert "secret" not in out, "sealed text reached a non-officer"
    event = _last_event(world, who, "grants")
    assert event.reason == "", "a non-officer's listing claims sealed text was shown"


def test_swapped_sealed_reason_is_marked_never_shown(world: World) -> None:
    donor = _break_glass(world, new_patient(), "synthetic: donor reason (swap test)")
    target = _break_glass(world, new_patient(), "synthetic: target reason (swap test)")
    _swap(world, target.id, donor.id, "sealed_reason")

    listing = world.cli("so-view", "access", "list", "--principal", "dr-view", "--all")
    row = _cells(listing, target.id)
    assert row["STATE"] == ALTERED
    assert row["REASON"] == ALTERED_MARK[:50][:-1] + "…" or row["REASON"] == ALTERED_MARK
    assert "donor" not in _row(listing, target.id), "the swapped-in reason was shown"
    assert _cells(listing, donor.id)["REASON"] == "synthetic: donor reason (swap test)"
    queue = world.cli("so-view", "audit", "review")
    assert _cells(queue, target.id)["REASON"] == TAMPERED_MARK
    assert "donor" not in _row(queue, target.id)
    assert _tampered(world, target.id), "no grant-tampered incident"
    # The altered row grants nothing, and others who list grants do not see it at all.
    request = apb.ListGrantsRequest(principal="dr-view", include_inactive=True)
    ward = world.ward.access.ListGrants(request, timeout=TIMEOUT).grants
    assert target.id not in {g.id for g in ward}


def test_swapped_review_is_marked_and_does_not_count(world: World) -> None:
    donor = _break_glass(world, new_patient(), "synthetic: donor (review swap)")
    target = _break_glass(world, new_patient(), "synthetic: target (review swap)")
    _review(world, donor.id, "synthetic: donor's review")
    engine = engine_for(world.database)
    try:  # the writer marks the target reviewed with the donor's sealed comment
        with engine.begin() as connection:
            c = access_grants.c
            donor_row = connection.execute(sa.select(access_grants).where(c.id == donor.id)).one()
            connection.execute(access_grants.update().where(c.id == target.id).values(
                reviewed_at=donor_row.reviewed_at, reviewed_by=donor_row.reviewed_by,
                sealed_comment=donor_row.sealed_comment,
            ))  # fmt: skip
    finally:
        engine.dispose()
    queue = world.cli("so-view", "audit", "review")
    row = _cells(queue, target.id)
    assert row["REVIEWED"] == "no", "a review written in the database counted"
    assert row["COMMENT"] == REVIEW_ALTERED_MARK
    assert "donor" not in _row(queue, target.id)
    listing = world.cli("so-view", "access", "list", "--principal", "dr-view", "--all")
    assert _cells(listing, target.id)["REVIEW"] == REVIEW_ALTERED_MARK
    assert _tampered(world, target.id), "no grant-tampered incident"
    # The planted review does not block the real one; the event says it was replaced.
    world.cli("so-view", "audit", "review", target.id, "--comment", "synthetic: real review")
    row = _cells(world.cli("so-view", "audit", "review", "--all"), target.id)
    assert row["REVIEWED"].startswith("yes, so-view ")
    assert row["COMMENT"] == "synthetic: real review"
    assert _last_event(world, "so-view", f"grant/{target.id}").reason == REPLACED


def test_audit_query_keeps_the_reason_visible(world: World) -> None:
    patient = new_patient()
    record = put_record(world.clerk, patient)
    grant = _break_glass(world, patient, "synthetic: query layout test")
    assert fetch(world.dr, record.id).error is None
    reason = f"break-the-glass grant {grant.id}"
    args = ("audit", "query", "--principal", "dr-view", "--action", "records.read")
    narrow = world.cli_on_terminal("so-view", *args, columns=120)
    lines = narrow.splitlines()
    assert all(len(line) <= 120 for line in lines), "table wider than the terminal"
    # The reason is whole (its id shortened); RESOURCE gave up width first.
    (row,) = [line for line in lines if line.endswith(f"break-the-glass grant {grant.id[:8]}…")]
    assert f"record/{record.id[:6]}" in row
    assert grant.id not in narrow, "a 32-hex id printed whole by default"
    full = world.cli("so-view", *args, "--full-ids")
    assert reason in full
    assert f"record/{record.id}/v1" in full
    piped = world.cli("so-view", *args)  # a pipe is not fitted, ids still shortened
    assert f"record/{record.id[:8]}…/v1" in piped
    assert grant.id not in piped


@contextmanager
def _officer_events_fail(w: World) -> Iterator[None]:
    """The trail refuses the events of the officer's listings (and only those)."""
    sqlite = is_sqlite(w.database)
    engine = engine_for(w.database)
    when = "NEW.resource IN ('grants', 'break-glass-queue')"
    try:
        with engine.begin() as c:
            if sqlite:
                c.execute(sa.text(
                    f"CREATE TRIGGER officer_fail BEFORE INSERT ON audit_events WHEN {when} "
                    "BEGIN SELECT RAISE(FAIL, 'injected audit write error'); END"
                ))  # fmt: skip
            else:
                c.execute(sa.text(
                    "CREATE FUNCTION officer_fail() RETURNS trigger LANGUAGE plpgsql AS "
                    f"$$ BEGIN IF {when} THEN RAISE EXCEPTION 'injected audit write error'; "
                    "END IF; RETURN NEW; END $$"
                ))  # fmt: skip
                c.execute(sa.text(
                    "CREATE TRIGGER officer_fail BEFORE INSERT ON audit_events "
                    "FOR EACH ROW EXECUTE FUNCTION officer_fail()"
                ))  # fmt: skip
        yield
    finally:
        with engine.begin() as c:
            if sqlite:
                c.execute(sa.text("DROP TRIGGER IF EXISTS officer_fail"))
            else:
                c.execute(sa.text("DROP TRIGGER IF EXISTS officer_fail ON audit_events"))
                c.execute(sa.text("DROP FUNCTION IF EXISTS officer_fail()"))
        engine.dispose()


def test_no_sealed_text_leaves_unless_its_reading_is_audited(world: World) -> None:
    grant = _break_glass(world, new_patient(), "synthetic: fail-closed reason")
    listing = apb.ListGrantsRequest(principal="dr-view", include_inactive=True)
    queue = aupb.ListBreakGlassRequest(include_reviewed=True)
    with _officer_events_fail(world):
        for call, request in ((world.officer.access.ListGrants, listing),
                              (world.officer.audit.ListBreakGlass, queue)):  # fmt: skip
            with pytest.raises(grpc.RpcError) as caught:
                call(request, timeout=TIMEOUT)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    reply = world.officer.access.ListGrants(listing, timeout=TIMEOUT)
    assert {g.id: g.reason for g in reply.grants}[grant.id] == "synthetic: fail-closed reason"
