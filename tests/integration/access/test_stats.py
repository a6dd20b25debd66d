"""SDMX-HD statistics (issue 11, item 6), on SQLite and PostgreSQL.

A real server holds synthetic records of several kinds; ``medvault stats export`` runs
as a subprocess with a records clerk's certificate and writes an SDMX-ML 2.1 data
message, which the ``sdmx1`` package (an independent implementation) reads back against
the DSD the project ships. The numbers must be the records put here, month by month in
the facility's time zone; counts under the threshold are withheld by the service (the
reply carries no number for them) and flagged CONF_STATUS=C in the message. Every role
without ``stats.export`` is refused and audited; each export is one audit event; a row
edited in the database fails the export (DATA_LOSS) and raises an incident.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import pytest
import sdmx

from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import stats_pb2 as spb
from service._gen.medvault.v1 import stats_pb2_grpc as spb_grpc
from service.cli import sdmx as medvault_sdmx
from storage.sql_metadata import records
from tests import content
from tests.fixtures.service import ROOT, RunningService
from tests.integration.access.helpers import (
    TIMEOUT,
    Client,
    client,
    engine_for,
    events,
    new_patient,
)
from tests.unit.service.authz_matrix import DENY, EXPECTED, ROLES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FACILITY = "79001"
ZONE = "Asia/Ho_Chi_Minh"  # UTC+7: a month's bounds are not UTC's
MIN_CELL = 3
# Records put per kind: 1 and 2 are under MIN_CELL (withheld), 0 is shown, 3+ published.
PUT = {"CDA": 4, "HL7V2": 3, "FHIR": 1, "DICOM": 2, "OTHER": 3}
CONTENT_TYPES = {"CDA": "application/xml", "HL7V2": "x-application/hl7-v2+er7",
                 "FHIR": "application/fhir+json", "DICOM": "application/dicom",
                 "PDF": "application/pdf", "OTHER": "application/octet-stream"}  # fmt: skip
DSD_PATH = ROOT / "service" / "cli" / "sdmx" / "medvault-records-dsd.xml"
METHOD = "/medvault.v1.StatsService/CountRecords"


@dataclass
class World:
    service: RunningService
    database: str
    clerk_cert: tuple[Path, Path]
    clerk: Client
    stats: spb_grpc.StatsServiceStub
    officer: Client
    issue: Any
    expected: Counter[tuple[str, str]]  # (month, kind) -> new records put
    amended: str  # id of the record that got a second version

    def export(self, period: str, out: Path) -> str:
        """``medvault stats export`` as the clerk; its stderr (exit 0 asserted)."""
        cert, key = self.clerk_cert
        command = [sys.executable, "-m", "service", "stats", "export", "--period", period,
                   "-o", str(out), "--endpoint", self.service.endpoint,
                   "--ca", str(self.service.tls.ca), "--cert", str(cert), "--key", str(key)]
        result = subprocess.run(
            command, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-300:]}"
        assert "Traceback" not in result.stderr
        return result.stderr


def _put(c: Client, kind: str, patient: pb.PatientId, supersedes: str = "") -> pb.Record:
    data = content.content(kind, patient.id, patient.assigning_authority) if kind in (
        "CDA", "HL7V2", "FHIR", "DICOM", "PDF") else b"synthetic other"
    head = pb.RecordHeader(patient=patient, kind=pb.RecordKind.Value(f"RECORD_KIND_{kind}"),
                           content_type=CONTENT_TYPES[kind], supersedes=supersedes)
    requests = iter([pb.PutRecordRequest(header=head), pb.PutRecordRequest(chunk=data)])
    record: pb.Record = c.records.PutRecord(requests, timeout=TIMEOUT)
    return record


def _month(record: pb.Record) -> str:
    return record.created_at.ToDatetime(tzinfo=ZoneInfo("UTC")).astimezone(
        ZoneInfo(ZONE)).strftime("%Y-%m")


@pytest.fixture(scope="module")
def world(service_factory: Any, fresh_database: str, issue: Any) -> Iterator[World]:
    service: RunningService = service_factory(
        fresh_database,
        extra_sections={"stats": {"facility": FACILITY, "time_zone": ZONE,
                                  "min_cell": MIN_CELL}},
    )  # fmt: skip
    clerk_cert = issue("clerk-stats", "records_clerk")
    clerk = client(service, clerk_cert)
    officer = client(service, issue("officer-stats", "security_officer"))
    expected: Counter[tuple[str, str]] = Counter()
    for kind, count in PUT.items():
        for _ in range(count):
            patient = new_patient()
            record = _put(clerk, kind, patient)
            expected[_month(record), kind] += 1
    # A second version (of the last OTHER record) is not a new record: not counted.
    amended = _put(clerk, "OTHER", patient, supersedes=record.id)
    assert (amended.id, amended.version) == (record.id, 2)
    yield World(service, fresh_database, clerk_cert, clerk,
                spb_grpc.StatsServiceStub(clerk.channel), officer, issue, expected,
                record.id)  # fmt: skip
    clerk.close()
    officer.close()
    service.stop()


def _months(w: World) -> list[str]:
    return sorted({month for month, _ in w.expected})


def _structures() -> Any:
    message = sdmx.read_sdmx(DSD_PATH)
    return message, message.structure[medvault_sdmx.DSD_ID]


def test_shipped_dsd_is_what_the_cli_prints_and_refers_to() -> None:
    assert medvault_sdmx.structure_message() == DSD_PATH.read_bytes()
    message, dsd = _structures()
    assert (dsd.maintainer.id, dsd.id, dsd.version) == (
        medvault_sdmx.AGENCY, medvault_sdmx.DSD_ID, medvault_sdmx.VERSION)
    assert [d.id for d in dsd.dimensions] == ["FREQ", "FACILITY", "RECORD_KIND", "TIME_PERIOD"]
    assert [a.id for a in dsd.attributes] == ["CONF_STATUS"]
    assert [m.id for m in dsd.measures] == ["OBS_VALUE"]
    kinds = {code.id for code in message.codelist["CL_RECORD_KIND"]}
    assert kinds == set(medvault_sdmx_kinds()), "CL_RECORD_KIND differs from the proto's kinds"
    assert message.dataflow["DF_MEDVAULT_RECORDS"].structure is dsd


def _observations(path: Path) -> tuple[Any, dict[str, tuple[str | None, str]]]:
    """Read ``path`` with sdmx1 against the shipped DSD; check it against the structure.

    Returns the message and, per record kind, (OBS_VALUE or None, CONF_STATUS).
    """
    structures, dsd = _structures()
    message = sdmx.read_sdmx(io.BytesIO(path.read_bytes()), structure=dsd)
    assert len(message.data) == 1
    dataset = message.data[0]
    (facet,) = dsd.dimensions.get("FACILITY").local_representation.non_enumerated
    facility_facet = facet.type
    found: dict[str, tuple[str | None, str]] = {}
    for key, observations in dataset.series.items():
        values = {k: v.value for k, v in key.values.items()}
        assert set(values) == {"FREQ", "FACILITY", "RECORD_KIND"}, "series key incomplete"
        assert values["FREQ"] in structures.codelist["CL_FREQ"]
        assert values["RECORD_KIND"] in structures.codelist["CL_RECORD_KIND"]
        assert re.fullmatch(facility_facet.pattern, values["FACILITY"])
        assert len(values["FACILITY"]) <= facility_facet.max_length
        assert len(observations) == 1
        obs = observations[0]
        status = obs.attached_attribute["CONF_STATUS"].value
        assert status in structures.codelist["CL_CONF_STATUS"]
        assert values["RECORD_KIND"] not in found, "a kind reported twice"
        found[values["RECORD_KIND"]] = (obs.value, status)
        (time_period,) = obs.dimension.values.values()
        assert time_period.id == "TIME_PERIOD"
    return message, found


def _expected(w: World, month: str) -> dict[str, tuple[str | None, str]]:
    want = {}
    for code in medvault_sdmx_kinds():
        n = w.expected[month, code]
        want[code] = (None, "C") if 0 < n < MIN_CELL else (str(n), "F")
    return want


def medvault_sdmx_kinds() -> list[str]:
    names = [v.name for v in pb.RecordKind.DESCRIPTOR.values]
    return [n.removeprefix("RECORD_KIND_") for n in names if n != "RECORD_KIND_UNSPECIFIED"]


def test_export_reads_back_with_sdmx1_and_matches_the_records(
    world: World, tmp_path: Path
) -> None:
    for month in _months(world):
        out = tmp_path / f"stats-{month}.xml"
        note = world.export(month, out)
        message, found = _observations(out)
        assert found == _expected(world, month), f"counts of {month} differ"
        assert message.header.sender.id == FACILITY
        time_periods = {
            str(o.dimension.values["TIME_PERIOD"].value)
            for obs in message.data[0].series.values() for o in obs
        }
        assert time_periods == {month}
        assert f"facility {FACILITY}, {month} ({ZONE})" in note


def test_another_month_is_all_zero(world: World, tmp_path: Path) -> None:
    first = datetime.strptime(_months(world)[0] + "-01", "%Y-%m-%d")
    before = f"{first.year - 1}-12" if first.month == 1 else f"{first.year}-{first.month - 1:02d}"
    out = tmp_path / "before.xml"
    world.export(before, out)
    _, found = _observations(out)
    assert found == {kind: ("0", "F") for kind in medvault_sdmx_kinds()}


def test_reply_carries_no_number_for_a_withheld_cell(world: World) -> None:
    month = _months(world)[0]
    reply = world.stats.CountRecords(spb.CountRecordsRequest(period=month), timeout=TIMEOUT)
    assert (reply.facility, reply.time_zone, reply.min_cell) == (FACILITY, ZONE, MIN_CELL)
    withheld = [c for c in reply.counts if c.suppressed]
    assert withheld, "the fixture should leave cells under the threshold"
    assert all(c.records == 0 for c in withheld)
    assert len(reply.counts) == len(medvault_sdmx_kinds())


def test_each_export_is_one_audit_event(world: World, tmp_path: Path) -> None:
    month = _months(world)[0]
    resource = f"stats/records/{month}"

    def exports() -> list[aupb.AuditEvent]:
        return [e for e in events(world.officer, principal="clerk-stats", action="stats.export")
                if e.resource == resource]

    before = len(exports())
    world.export(month, tmp_path / "one.xml")
    after = exports()
    assert len(after) == before + 1
    event = after[-1]
    assert event.outcome == aupb.OUTCOME_ALLOWED
    assert event.role == "records_clerk"
    assert not event.patient_index, "an aggregate export names no patient"


def test_the_matrix_gives_the_export_to_the_records_clerk_only() -> None:
    assert [r for r in ROLES if EXPECTED[r][METHOD] != DENY] == ["records_clerk"]


@pytest.mark.parametrize("role", [r for r in ROLES if EXPECTED[r][METHOD] == DENY])
def test_roles_without_the_permission_are_refused_and_audited(world: World, role: str) -> None:
    name = f"stats-{role}"
    c = client(world.service, world.issue(name, role))
    try:
        stub = spb_grpc.StatsServiceStub(c.channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.CountRecords(spb.CountRecordsRequest(period="2026-10"), timeout=TIMEOUT)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        c.close()
    denied = events(world.officer, principal=name, outcome=aupb.OUTCOME_DENIED)
    assert [(e.action, e.resource) for e in denied] == [("stats.export", METHOD)]


@pytest.mark.parametrize("period", ["2026-13", "2026-1", "junk", "", "1969-12"])
def test_bad_period_is_invalid_argument_naming_the_field(world: World, period: str) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        world.stats.CountRecords(spb.CountRecordsRequest(period=period), timeout=TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith("period: ")
    failed = events(world.officer, principal="clerk-stats", outcome=aupb.OUTCOME_FAILED)
    assert failed
    assert failed[-1].status == "INVALID_ARGUMENT"
    assert failed[-1].resource.startswith("stats/records/")


def test_a_row_edited_in_the_database_fails_the_export(world: World) -> None:
    """A database writer moving a record to another kind must not skew a count."""
    month = _months(world)[0]
    engine = engine_for(world.database)
    victim = world.amended
    try:
        with engine.begin() as c:
            c.execute(records.update().where(records.c.id == victim, records.c.version == 1)
                      .values(kind="PDF"))
        with pytest.raises(grpc.RpcError) as raised:
            world.stats.CountRecords(spb.CountRecordsRequest(period=month), timeout=TIMEOUT)
        assert raised.value.code() == grpc.StatusCode.DATA_LOSS
        incidents = [e for e in events(world.officer, action="incident")
                     if e.status == "row-tampered" and e.resource == f"record/{victim}/v1"]
        assert len(incidents) == 1
    finally:
        with engine.begin() as c:
            c.execute(records.update().where(records.c.id == victim, records.c.version == 1)
                      .values(kind="OTHER"))
        engine.dispose()
    reply = world.stats.CountRecords(spb.CountRecordsRequest(period=month), timeout=TIMEOUT)
    assert reply.counts, "the restored row counts again"
