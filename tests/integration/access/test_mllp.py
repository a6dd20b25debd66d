"""HL7 v2 over MLLP through the real service: TLS client certificates, ACK/NAK with
ERR, duplicates by MSH-10, the frame cap, the idle deadline, the connection cap.

A laboratory system is a certificate whose role holds records.write (unscoped); what it
sends is read back over gRPC by a physician the clerk granted the patient. Assertion
messages name codes and counts only.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hl7
import pytest
import sqlalchemy as sa

from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import records_pb2 as pb
from storage.sql_metadata import records
from tests import content
from tests.fixtures.service import DEFAULT_POLICY, TEST_POLICY_EXTRA, RunningService, free_port
from tests.integration.access.helpers import (
    AUTHORITY,
    client,
    engine_for,
    events,
    fetch,
    grant,
    new_patient,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

LAB, CLERK, DOCTOR, OFFICER, AUDITOR = (
    "lab-analyser", "clerk-mllp", "dr-mllp", "officer-mllp", "auditor-mllp",
)  # fmt: skip
LAB_ROLE = """
[roles.lab_interface]
description = "A laboratory system: stores results (HL7 v2 over MLLP), reads nothing"
permissions = ["records.write"]
"""
FRAME_CAP = 64 << 10
PER_PRINCIPAL = 2


class Mllp:
    """A test client: one TLS connection, one framed message, its ACK."""

    def __init__(self, port: int, ca: Path, cert: tuple[Path, Path] | None) -> None:
        context = ssl.create_default_context(cafile=str(ca))
        if cert is not None:
            context.load_cert_chain(str(cert[0]), str(cert[1]))
        raw = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")

    def send(self, message: bytes, *, end: bool = True) -> None:
        self.sock.sendall(b"\x0b" + message + (b"\x1c\r" if end else b""))

    def ack(self) -> hl7.Message | None:
        """The next ACK, or None when the server closed the connection instead."""
        data = bytearray()
        while not data.endswith(b"\x1c\r"):
            try:
                chunk = self.sock.recv(65536)
            except (ssl.SSLError, ConnectionError):
                return None
            if not chunk:
                return None
            data += chunk
        assert data.startswith(b"\x0b"), "ACK frame does not start with 0x0B"
        return hl7.parse(bytes(data[1:-2]).decode("latin-1"))

    def closed(self) -> bool:
        """True once the server has closed (EOF or a TLS alert), without an ACK."""
        try:
            return self.sock.recv(65536) == b""
        except (ssl.SSLError, ConnectionError):
            return True

    def close(self) -> None:
        self.sock.close()


def msa(reply: hl7.Message | None) -> tuple[str, str]:
    assert reply is not None, "no ACK: the connection was closed"
    return str(reply.segment("MSA")[1]), str(reply.segment("MSA")[2])


def answered(reply: hl7.Message | None) -> hl7.Message:
    assert reply is not None, "no ACK: the connection was closed"
    return reply


def err_code(reply: hl7.Message) -> str:
    return str(reply.extract_field("ERR", 1, 3, 1, 1))


def err_text(reply: hl7.Message) -> str:
    return str(reply.segment("ERR")[8])


@pytest.fixture(scope="module")
def lab_service(service_factory: Any, fresh_database: str) -> Iterator[RunningService]:
    port = free_port()
    service: RunningService = service_factory(
        fresh_database, policy=DEFAULT_POLICY.read_text() + TEST_POLICY_EXTRA + LAB_ROLE,
        extra_sections={"mllp": {
            "listen": f"127.0.0.1:{port}", "max_frame_bytes": FRAME_CAP, "idle_seconds": 3,
            "max_connections_per_principal": PER_PRINCIPAL,
        }},
    )  # fmt: skip
    service.mllp_port = port  # type: ignore[attr-defined]
    yield service
    service.stop()


@pytest.fixture(scope="module")
def people(lab_service: RunningService, issue: Any) -> Iterator[dict[str, Any]]:
    made = {
        "lab": issue(LAB, "lab_interface"),
        "clerk": client(lab_service, issue(CLERK, "records_clerk")),
        "doctor": client(lab_service, issue(DOCTOR, "physician")),
        "officer": client(lab_service, issue(OFFICER, "security_officer")),
        "auditor": issue(AUDITOR, "security_officer"),
        "lab-cap": issue("lab-cap", "lab_interface"),
    }
    yield made
    for name in ("clerk", "doctor", "officer"):
        made[name].close()


@pytest.fixture
def connect(lab_service: RunningService, people: dict[str, Any]) -> Iterator[Any]:
    opened: list[Mllp] = []

    def make(who: str | None = "lab", cert: tuple[Path, Path] | None = None) -> Mllp:
        c = Mllp(lab_service.mllp_port, lab_service.tls.ca,  # type: ignore[attr-defined]
                 cert or (people[who] if who else None))
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.close()


def rows(database: str) -> int:
    engine = engine_for(database)
    try:
        with engine.connect() as c:
            return int(c.scalar(sa.select(sa.func.count()).select_from(records)) or 0)
    finally:
        engine.dispose()


def hl7_records(doctor: Any, patient: pb.PatientId) -> list[pb.Record]:
    reply = doctor.records.ListRecords(pb.ListRecordsRequest(patient=patient), timeout=30)
    return [r for r in reply.records if r.kind == pb.RECORD_KIND_HL7V2]


def message(patient: pb.PatientId, control_id: str, **options: Any) -> bytes:
    return content.hl7v2(patient.id, patient.assigning_authority, control_id=control_id,
                         **options)


def test_result_is_stored_acknowledged_and_readable_by_the_granted_physician(
    connect: Any, people: dict[str, Any]
) -> None:
    patient = new_patient()
    grant(people["clerk"], patient, DOCTOR)
    sent = message(patient, "LAB-0001", observations=content.PCD01_OBSERVATIONS)
    lab = connect()
    lab.send(sent)
    reply = lab.ack()
    assert msa(reply) == ("AA", "LAB-0001")
    assert reply is not None
    msh = reply.segment("MSH")
    # The sender and receiver swap: the lab (LAB/HOSP) is now the receiver.
    assert (str(msh[3]), str(msh[5])) == ("EMR", "LAB"), "MSH-3/MSH-5 not swapped"
    assert str(msh[9]).startswith("ACK"), "MSH-9 is not an ACK"
    assert "\rERR" not in str(reply), "an ERR segment in an AA"
    stored = hl7_records(people["doctor"], patient)
    assert len(stored) == 1, f"{len(stored)} HL7V2 records"
    got = fetch(people["doctor"], stored[0].id)
    assert got.error is None, got.code.name
    assert got.content == sent, "the stored message differs"
    assert stored[0].created_by == LAB
    # Indexed as any HL7V2 write: its IEEE 11073 observations are searchable.
    found = people["doctor"].records.ListRecords(pb.ListRecordsRequest(
        patient=patient, observation_code="MDC_PULS_OXIM_SAT_O2"), timeout=30)
    assert [r.id for r in found.records] == [stored[0].id], "observation not indexed"
    written = events(people["officer"], principal=LAB, action="records.write",
                     outcome=aupb.OUTCOME_ALLOWED)
    assert any(e.resource == f"record/{stored[0].id}/v1" for e in written), "write not audited"


def test_duplicate_control_id_is_acknowledged_without_a_second_record(
    connect: Any, people: dict[str, Any]
) -> None:
    patient = new_patient()
    grant(people["clerk"], patient, DOCTOR)
    sent = message(patient, "LAB-DUP-1")
    first = connect()
    first.send(sent)
    assert msa(first.ack()) == ("AA", "LAB-DUP-1")
    first.send(sent)  # a retransmission on the same connection...
    assert msa(first.ack()) == ("AA", "LAB-DUP-1")
    again = connect()
    again.send(sent)  # ...and on a new one
    assert msa(again.ack()) == ("AA", "LAB-DUP-1")
    assert len(hl7_records(people["doctor"], patient)) == 1, "a duplicate was stored again"
    # The same control id with other content is an error, not a silent overwrite.
    changed = sent.replace(b"13.5", b"14.5")
    again.send(changed)
    reply = again.ack()
    assert msa(reply) == ("AE", "LAB-DUP-1")
    assert err_code(answered(reply)) == "205", "ERR-3 is not 205"
    assert len(hl7_records(people["doctor"], patient)) == 1
    # Duplicates are per sender: another sending application may reuse the number.
    other = sent.replace(b"MSH|^~\\&|LAB|", b"MSH|^~\\&|LAB2|")
    again.send(other)
    assert msa(again.ack()) == ("AA", "LAB-DUP-1")
    assert len(hl7_records(people["doctor"], patient)) == 2


def test_malformed_messages_get_ae_or_ar_with_err_store_nothing_and_are_audited(
    connect: Any, people: dict[str, Any], fresh_database: str
) -> None:
    patient, other = new_patient(), new_patient()
    good = message(patient, "LAB-BAD")
    pid = good[good.index(b"PID|"):good.index(b"\rOBR")]
    cases = [  # (message, MSA-1, ERR-3, what ERR names)
        (b"HELLO " + patient.id.encode(), "AR", "100", "MSH"),
        (good.replace(b"|LAB-BAD|", b"||"), "AR", "101", "MSH-10"),
        (good.replace(b"ORU^R01^ORU_R01", b""), "AR", "101", "MSH-9"),
        (good.replace(pid + b"\r", b""), "AE", "101", "PID"),
        (good.replace(b"^^^HOSP&2.999.42.7&ISO^MR", b""), "AE", "101", "CX.4"),
        (good + message(other, "X")[message(other, "X").index(b"PID|"):], "AE", "102",
         "more than one PID"),
        (good.replace(b"|2.5.1", b"|2.5.1||||||EBCDIC"), "AE", "103", "MSH-18"),
    ]
    assert AUTHORITY.endswith("2.999.42.7")
    before = rows(fresh_database)
    failed_before = len(events(people["officer"], principal=LAB, outcome=aupb.OUTCOME_FAILED))
    lab = connect()
    for data, code, err, named in cases:
        lab.send(data)
        reply = lab.ack()
        got, _control = msa(reply)
        assert reply is not None
        assert (got, err_code(reply)) == (code, err), f"{named}: {got} {err_code(reply)}"
        assert named in err_text(reply), f"{named}: ERR does not name it"
        assert patient.id not in str(reply), "a value echoed"
        assert other.id not in str(reply), "a value echoed"
    assert rows(fresh_database) == before, "a refused message was stored"
    failed = events(people["officer"], principal=LAB, outcome=aupb.OUTCOME_FAILED)
    assert len(failed) == failed_before + len(cases), "a refusal was not audited"
    assert all(e.action == "records.write" for e in failed[failed_before:])


def test_role_without_records_write_is_rejected_and_audited(
    connect: Any, people: dict[str, Any], fresh_database: str
) -> None:
    patient = new_patient()
    before = rows(fresh_database)
    denied_before = len(events(people["officer"], principal=AUDITOR,
                               outcome=aupb.OUTCOME_DENIED))
    auditor = connect("auditor")
    auditor.send(message(patient, "AUD-1"))
    reply = auditor.ack()
    assert msa(reply) == ("AR", "AUD-1")
    assert "records.write" in err_text(answered(reply))
    assert rows(fresh_database) == before
    denied = events(people["officer"], principal=AUDITOR, outcome=aupb.OUTCOME_DENIED)
    assert len(denied) == denied_before + 1, "the denial was not audited"
    assert denied[-1].action == "records.write"


@pytest.mark.parametrize("which", ["none", "untrusted"])
def test_no_or_untrusted_client_certificate_gets_no_association(
    connect: Any, lab_service: RunningService, fresh_database: str, which: str
) -> None:
    before = rows(fresh_database)
    tls = lab_service.tls
    try:
        c = (connect(None) if which == "none"
             else connect(cert=(tls.other_ca_client_cert, tls.other_ca_client_key)))
        c.send(message(new_patient(), "NOCERT-1"))
        assert c.ack() is None, "an ACK without a trusted client certificate"
    except (ssl.SSLError, ConnectionError):
        pass  # refused during the handshake (TLS 1.2)
    assert rows(fresh_database) == before


@pytest.mark.parametrize("ended", [True, False])
def test_oversized_frame_is_rejected_and_the_connection_closed(
    connect: Any, people: dict[str, Any], fresh_database: str, ended: bool
) -> None:
    patient = new_patient()
    big = message(patient, "BIG-1", observations=[
        "OBX|1|ED|PDF^Report^L||^AP^PDF^Base64^" + "A" * (FRAME_CAP + 1024) + "||||||F"
    ])
    before = rows(fresh_database)
    failed_before = len(events(people["officer"], principal=LAB, outcome=aupb.OUTCOME_FAILED))
    lab = connect()
    lab.send(big, end=ended)
    reply = lab.ack()
    assert msa(reply) == ("AR", "BIG-1")
    assert "larger than" in err_text(answered(reply))
    assert lab.closed(), "the connection stayed open"
    assert rows(fresh_database) == before
    failed = events(people["officer"], principal=LAB, outcome=aupb.OUTCOME_FAILED)
    assert [e.status for e in failed[failed_before:]] == ["RESOURCE_EXHAUSTED"]


def test_frame_that_never_ends_is_closed_after_the_idle_time_and_audited(
    connect: Any, people: dict[str, Any], fresh_database: str
) -> None:
    before = rows(fresh_database)
    failed_before = len(events(people["officer"], principal=LAB, outcome=aupb.OUTCOME_FAILED))
    lab = connect()
    lab.send(message(new_patient(), "SLOW-1")[:40], end=False)
    assert lab.ack() is None, "an ACK for a frame that never ended"
    assert rows(fresh_database) == before
    failed = events(people["officer"], principal=LAB, outcome=aupb.OUTCOME_FAILED)
    assert [e.status for e in failed[failed_before:]] == ["DEADLINE_EXCEEDED"]


def test_connections_per_principal_are_capped(
    connect: Any, people: dict[str, Any]
) -> None:
    patient = new_patient()
    held = []
    for n in range(PER_PRINCIPAL):  # each counted once its first message is answered
        c = connect("lab-cap")
        c.send(message(patient, f"CAP-{n}"))
        assert msa(c.ack())[0] == "AA"
        held.append(c)
    denied_before = len(events(people["officer"], principal="lab-cap",
                               outcome=aupb.OUTCOME_DENIED))
    extra = connect("lab-cap")
    extra.send(message(patient, "CAP-X"))
    assert extra.ack() is None, "a connection over the cap was served"
    denied = events(people["officer"], principal="lab-cap", outcome=aupb.OUTCOME_DENIED)
    assert [e.status for e in denied[denied_before:]] == ["RESOURCE_EXHAUSTED"]
    held[0].close()
    # A slot freed is available again (the server notices the close first).
    for _ in range(50):
        again = connect("lab-cap")
        again.send(message(patient, "CAP-Y"))
        reply = again.ack()
        if reply is not None:
            assert msa(reply)[0] == "AA"
            break
    else:
        pytest.fail("a freed connection slot was never reused")


def test_shutdown_closes_idle_connections_and_exits_cleanly(
    service_factory: Any, fresh_database: str, issue: Any
) -> None:
    port = free_port()
    service: RunningService = service_factory(
        fresh_database, policy=DEFAULT_POLICY.read_text() + TEST_POLICY_EXTRA + LAB_ROLE,
        extra_sections={"mllp": {"listen": f"127.0.0.1:{port}"}},
    )
    lab = Mllp(port, service.tls.ca, issue("lab-stop", "lab_interface"))
    try:
        lab.send(message(new_patient(), "STOP-1"))
        assert msa(lab.ack())[0] == "AA"
        service.terminate()  # the connection stays open and idle meanwhile
        assert lab.closed(), "the idle connection was not closed on shutdown"
        assert service.process.wait(timeout=60) == 0, "the server did not exit cleanly"
        assert "Traceback" not in service.log_path.read_text()
    finally:
        lab.close()
        service.stop()
