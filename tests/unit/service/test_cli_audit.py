"""``medvault audit ...``: argument parsing, request building and the report grouping."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service._gen.medvault.v1 import audit_pb2 as pb
from service.cli import audit_cmd, audit_reports
from service.cli.main import parser
from service.cli.options import parse_when

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def parse(*argv: str) -> argparse.Namespace:
    return parser().parse_args(list(argv))


def event(**fields: Any) -> pb.AuditEvent:
    """A synthetic event; ``at`` is seconds after T0."""
    at = fields.pop("at", 0)
    values: dict[str, Any] = {
        "principal": "dr-a", "action": "records.read", "outcome": pb.OUTCOME_ALLOWED,
        "source": "ipv4:10.0.0.7:5000", "patient_index": "ab" * 32,
    }  # fmt: skip
    values.update(fields)
    msg = pb.AuditEvent(**values)
    msg.time.FromDatetime(T0 + timedelta(seconds=at))
    return msg


def test_query_flags_become_a_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDVAULT_AUTHORITY", raising=False)
    ns = parse("audit", "query", "--since", "2026-01-02T03:04:05", "--until", "2026-01-03",
               "--principal", "dr-a", "--patient", "P1", "--authority", "HOSP",
               "--action", "records.read", "--outcome", "denied", "--limit", "5")
    request = audit_cmd.query_request(ns)
    assert request.since.ToDatetime(tzinfo=UTC) == T0
    assert request.until.ToDatetime(tzinfo=UTC) == datetime(2026, 1, 3, tzinfo=UTC)
    assert (request.principal, request.action, request.limit) == ("dr-a", "records.read", 5)
    assert request.outcome == pb.OUTCOME_DENIED
    assert (request.patient.id, request.patient.assigning_authority) == ("P1", "HOSP")
    assert ns.func is audit_cmd.cmd_query


def test_query_defaults() -> None:
    request = audit_cmd.query_request(parse("audit", "query"))
    assert request.limit == 1000
    assert not request.HasField("since")
    assert not request.HasField("patient")
    assert request.outcome == pb.OUTCOME_UNSPECIFIED


def test_patient_without_authority_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDVAULT_AUTHORITY", raising=False)
    ns = parse("audit", "query", "--patient", "P1")
    with pytest.raises(SystemExit, match="--authority"):
        audit_cmd.query_request(ns)


@pytest.mark.parametrize("argv", [
    ["audit", "query", "--outcome", "maybe"],
    ["audit", "query", "--limit", "-1"],
    ["audit", "query", "--since", "yesterday"],
    ["audit", "export", "--format", "xml", "-o", "x"],
    ["audit", "export", "--format", "csv"],
    ["audit", "disclosure"],
    ["audit", "top-readers", "--limit", "0"],
    ["audit"],
])  # fmt: skip
def test_bad_arguments_exit(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse(*argv)


def test_export_has_no_default_limit_and_fixed_fields_override() -> None:
    ns = parse("audit", "export", "--format", "fhir", "-o", "out.ndjson", "--since", "7d")
    assert ns.limit == 0
    assert (ns.format, ns.output) == ("fhir", "out.ndjson")
    request = audit_cmd.query_request(ns, outcome=pb.OUTCOME_FAILED)
    assert request.outcome == pb.OUTCOME_FAILED
    assert request.HasField("since")


def test_review_forms() -> None:
    listing = parse("audit", "review", "--all")
    assert (listing.grant_id, listing.all, listing.comment) == (None, True, None)
    marking = parse("audit", "review", "g-1", "--comment", "checked with ED")
    assert (marking.grant_id, marking.comment) == ("g-1", "checked with ED")


def test_reports_parse() -> None:
    disclosure = parse("audit", "disclosure", "--patient", "P1", "--authority", "H",
                       "--since", "30d")
    assert disclosure.func is audit_cmd.cmd_disclosure
    assert parse("audit", "denied", "--since", "24h").func is audit_cmd.cmd_denied
    top = parse("audit", "top-readers")
    assert (top.limit, top.func) == (10, audit_cmd.cmd_top_readers)
    assert parse("audit", "verify").func is audit_cmd.cmd_verify


def test_parse_when_spans_and_zones() -> None:
    assert parse_when("90m", now=T0) == T0 - timedelta(minutes=90)
    assert parse_when("7d", now=T0) == T0 - timedelta(days=7)
    assert parse_when("2026-01-02T10:04:05+07:00") == T0
    assert parse_when("2026-01-02T03:04:05") == T0


def test_denied_summary_groups_by_principal_host_action() -> None:
    events = [
        event(outcome=pb.OUTCOME_DENIED, status="PERMISSION_DENIED", at=1),
        event(outcome=pb.OUTCOME_DENIED, status="PERMISSION_DENIED", at=5,
              source="ipv4:10.0.0.7:6000"),
        event(outcome=pb.OUTCOME_DENIED, status="UNAUTHENTICATED", principal="unauthenticated",
              action="/medvault.v1.RecordService/GetRecord", source="ipv6:[::1]:7000"),
        event(outcome=pb.OUTCOME_DENIED, application="his", status="PERMISSION_DENIED"),
        event(outcome=pb.OUTCOME_ALLOWED),
    ]  # fmt: skip
    groups = audit_reports.denied_summary(events)
    keys = [(g.count, g.principal, g.source, g.action) for g in groups]
    assert keys == [
        (2, "dr-a", "10.0.0.7", "records.read"),
        (1, "dr-a via his", "10.0.0.7", "records.read"),
        (1, "unauthenticated", "::1", "/medvault.v1.RecordService/GetRecord"),
    ]
    assert groups[0].statuses == {"PERMISSION_DENIED"}
    assert groups[0].last_seconds == int((T0 + timedelta(seconds=5)).timestamp())


def test_top_readers_counts_allowed_reads_only() -> None:
    events = [
        event(principal="dr-a", patient_index="01" * 32),
        event(principal="dr-a", patient_index="02" * 32, at=9),
        event(principal="dr-a", patient_index="02" * 32),
        event(principal="nurse-b"),
        event(principal="nurse-b", outcome=pb.OUTCOME_DENIED),
        event(principal="clerk-c", action="records.write"),
        event(principal="zed"),
    ]
    ranked = audit_reports.top_readers(events, limit=2)
    assert [(r.principal, r.reads, len(r.patients)) for r in ranked] == [
        ("dr-a", 3, 2), ("nurse-b", 1, 1),
    ]
    assert ranked[0].last_seconds == int((T0 + timedelta(seconds=9)).timestamp())
    assert audit_reports.top_readers([], limit=3) == []


def test_disclosures_keep_allowed_reads_stats_lists() -> None:
    events = [
        event(action="records.read"), event(action="records.stat"),
        event(action="records.list"), event(action="records.write"),
        event(action="records.read", outcome=pb.OUTCOME_DENIED),
    ]  # fmt: skip
    assert [e.action for e in audit_reports.disclosures(events)] == [
        "records.read", "records.stat", "records.list",
    ]


@pytest.mark.parametrize(("source", "host"), [
    ("ipv4:10.0.0.7:51234", "10.0.0.7"),
    ("ipv6:[::1]:5000", "::1"),
    ("unix:/tmp/socket", "unix:/tmp/socket"),
    ("", ""),
])  # fmt: skip
def test_host_of(source: str, host: str) -> None:
    assert audit_reports.host_of(source) == host


def test_event_row_and_outcome_text() -> None:
    denied = event(outcome=pb.OUTCOME_DENIED, status="PERMISSION_DENIED", application="his",
                   sequence=42, reason="no grant")
    row = audit_cmd.event_row(denied)
    assert row == [42, "2026-01-02T03:04:05Z", "dr-a via his", "", "records.read", "",
                   "denied/PERMISSION_DENIED", "no grant"]
    assert audit_cmd.outcome_text(event()) == "allowed"


def test_event_row_shortens_ids_unless_asked() -> None:
    grant = "0f3b9e2c" + "1" * 24
    read = event(resource=f"record/{'9' * 32}/v1", reason=f"break-the-glass grant {grant}")
    row = audit_cmd.event_row(read)
    assert (row[5], row[7]) == ("record/99999999…/v1", "break-the-glass grant 0f3b9e2c…")
    full = audit_cmd.event_row(read, full_ids=True)
    assert (full[5], full[7]) == (f"record/{'9' * 32}/v1", f"break-the-glass grant {grant}")
    assert parse("audit", "query", "--full-ids").full_ids
