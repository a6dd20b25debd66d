"""The audit export formats: JSON lines, CSV and FHIR R4 AuditEvent NDJSON."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from fhir.resources.R4B.auditevent import AuditEvent

from service.audit import export
from storage.audit_model import GENESIS_HASH, AuditEntry, ChainedEvent, canonical_bytes, chain_hash

INDEX = bytes(range(32))
T0 = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)


def make_chain(*entries: AuditEntry) -> list[ChainedEvent]:
    """Chain synthetic entries the way the audit log does."""
    events, prev = [], GENESIS_HASH
    for sequence, entry in enumerate(entries, start=1):
        digest = chain_hash(prev, sequence, entry)
        events.append(ChainedEvent(sequence, entry, prev, digest))
        prev = digest
    return events


def entry(**overrides: Any) -> AuditEntry:
    """A synthetic allowed read by a delegated physician."""
    values: dict[str, Any] = {
        "time": T0, "principal": "dr-test", "application": "his-app",
        "role": "physician", "action": "records.read", "resource": "record/r-1/v2",
        "outcome": "allowed", "patient_index": INDEX, "source": "ipv4:10.0.0.7:51234",
    }  # fmt: skip
    values.update(overrides)
    return AuditEntry(**values)


def sample() -> list[ChainedEvent]:
    """One event of each kind the exporters distinguish."""
    return make_chain(
        entry(),
        entry(action="records.write", resource="record/r-2/v1"),
        entry(action="records.list", resource="patient-records"),
        entry(action="access.break_glass", resource="grant/g-1", reason="unconscious in ED"),
        entry(action="audit.query", resource="audit", application="", patient_index=None,
              role="security_officer", principal="so-test"),
        entry(action="incident", resource="incident/denied-burst", outcome="failed",
              status="denied-burst", reason="20 denied", principal="unknown", application="",
              role="", patient_index=None),
        entry(action="/medvault.v1.RecordService/GetRecord",
              resource="/medvault.v1.RecordService/GetRecord", outcome="denied",
              status="UNAUTHENTICATED", reason="token expired", principal="unauthenticated",
              application="", role="", patient_index=None),
        entry(action="records.read", outcome="denied", status="PERMISSION_DENIED",
              reason="no active care-team grant"),
    )


def joined(pieces: Any) -> bytes:
    return b"".join(pieces)


def test_jsonl_lines_parse_and_reproduce_the_chain() -> None:
    events = sample()
    lines = joined(export.to_jsonl(events)).decode("utf-8").splitlines()
    assert len(lines) == len(events)
    for line, event in zip(lines, events, strict=True):
        doc = json.loads(line)
        assert list(doc) == list(export.FIELDS)
        assert doc["sequence"] == event.sequence
        assert doc["hash"] == event.hash.hex()
        assert doc["prev_hash"] == event.prev_hash.hex()
        canonical = {k: v for k, v in doc.items() if k not in ("prev_hash", "hash")}
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert text.encode() == canonical_bytes(event.sequence, event.entry)


def test_jsonl_keeps_non_ascii_and_null_index() -> None:
    events = make_chain(entry(reason="bệnh nhân bất tỉnh", patient_index=None))
    doc = json.loads(joined(export.to_jsonl(events)))
    assert doc["reason"] == "bệnh nhân bất tỉnh"
    assert doc["patient_index"] is None


def test_csv_round_trips_with_csv_reader() -> None:
    events = sample()
    rows = list(csv.reader(io.StringIO(joined(export.to_csv(events)).decode("utf-8"))))
    assert rows[0] == list(export.FIELDS)
    assert len(rows) == len(events) + 1
    for row, event in zip(rows[1:], events, strict=True):
        fields = export.event_fields(event)
        expected = ["" if fields[name] is None else str(fields[name]) for name in export.FIELDS]
        assert row == expected
        assert row[export.FIELDS.index("hash")] == event.hash.hex()


def test_csv_quotes_commas_quotes_and_newlines() -> None:
    reason = 'line one,\n"two"'
    events = make_chain(entry(reason=reason))
    rows = list(csv.reader(io.StringIO(joined(export.to_csv(events)).decode("utf-8"))))
    assert rows[1][export.FIELDS.index("reason")] == reason


@pytest.mark.parametrize("reason", ["=HYPERLINK(\"http://x\")", "+1", "-2", "@SUM(A1)"])
def test_csv_neutralises_formula_cells(reason: str) -> None:
    events = make_chain(entry(reason=reason))
    rows = list(csv.reader(io.StringIO(joined(export.to_csv(events)).decode("utf-8"))))
    assert rows[1][export.FIELDS.index("reason")] == "'" + reason


def test_csv_of_no_events_is_the_header() -> None:
    assert joined(export.to_csv([])) == (",".join(export.FIELDS) + "\r\n").encode()


def fhir(events: list[ChainedEvent]) -> list[dict[str, Any]]:
    lines = joined(export.to_fhir(events)).decode("utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_fhir_required_fields() -> None:
    for resource in fhir(sample()):
        assert resource["resourceType"] == "AuditEvent"
        assert resource["type"]["system"] == export.DCM
        assert resource["recorded"].endswith("Z")
        assert resource["agent"][0]["requestor"] is True
        assert resource["source"]["observer"]["display"] == "medvault"
        assert resource["outcome"] in ("0", "4", "8")
        assert resource["action"] in ("C", "R", "E")


def test_fhir_codes() -> None:
    codes = [(r["type"]["code"], r["action"], r["outcome"]) for r in fhir(sample())]
    assert codes == [
        ("110110", "R", "0"),  # records.read
        ("110110", "C", "0"),  # records.write
        ("110112", "E", "0"),  # records.list
        ("110113", "E", "0"),  # break-the-glass
        ("110101", "E", "0"),  # audit.query
        ("110113", "E", "8"),  # incident
        ("110114", "E", "4"),  # failed authentication
        ("110110", "R", "4"),  # denied read
    ]


def test_fhir_agents_entities_and_chain() -> None:
    read, *_ = fhir(sample())
    person, app = read["agent"]
    assert person["who"]["identifier"]["value"] == "dr-test"
    assert person["role"] == [{"text": "physician"}]
    assert person["network"] == {"address": "10.0.0.7", "type": "2"}
    assert app["who"]["identifier"]["value"] == "his-app"
    assert app["requestor"] is False
    record, patient = read["entity"]
    assert record["what"]["identifier"]["value"] == "record/r-1/v2"
    assert patient["what"]["identifier"] == {
        "system": export.PATIENT_INDEX_SYSTEM, "value": INDEX.hex()
    }
    chain = {e["url"]: e["valueString"] for e in read["extension"][0]["extension"]}
    assert read["extension"][0]["url"] == export.CHAIN_EXTENSION
    first = sample()[0]
    assert chain == {"sequence": "1", "prevHash": GENESIS_HASH.hex(), "hash": first.hash.hex()}


def test_fhir_reason_and_outcome_description() -> None:
    resources = fhir(sample())
    assert resources[3]["purposeOfEvent"] == [{"text": "unconscious in ED"}]
    assert resources[7]["outcomeDesc"] == "PERMISSION_DENIED: no active care-team grant"
    assert "purposeOfEvent" not in resources[7]
    assert len(resources[4]["agent"]) == 1  # no delegating application
    assert "entity" in resources[4]


def test_fhir_one_role_entry_per_role() -> None:
    (resource,) = fhir(make_chain(entry(role="nurse,records_clerk")))
    assert resource["agent"][0]["role"] == [{"text": "nurse"}, {"text": "records_clerk"}]


def test_exporters_are_lazy() -> None:
    def events() -> Any:
        yield from sample()[:1]
        raise AssertionError("read past the first event")

    for exporter in export.EXPORTERS.values():
        first = next(iter(exporter(events())))
        assert first


def test_chunked_regroups_without_loss() -> None:
    pieces = [bytes([i]) * 10 for i in range(25)]
    chunks = list(export.chunked(pieces, size=64))
    assert b"".join(chunks) == b"".join(pieces)
    assert all(len(c) >= 64 for c in chunks[:-1])
    assert list(export.chunked([], size=64)) == []
    with pytest.raises(ValueError, match="positive"):
        list(export.chunked(pieces, size=0))


# The R4 value sets the exported codes must come from (hl7.org/fhir/R4: audit-event-type
# is the DICOM event IDs 110100-110114 plus the REST codes; network-type; outcome; action).
R4_AUDIT_EVENT_TYPES = {f"1101{n:02d}" for n in range(15)}
R4_NETWORK_TYPES = {"1", "2", "3", "4", "5"}
R4_OUTCOMES = {"0", "4", "8", "12"}
R4_ACTIONS = {"C", "R", "U", "D", "E"}


def all_kinds() -> list[ChainedEvent]:
    """``sample()`` plus a grant, an IPv6 caller, a replica's own event and a unix peer."""
    return make_chain(
        *(event.entry for event in sample()),
        entry(action="access.grant", resource="grant/g-2", source="ipv6:[::1]:5555"),
        entry(action="backup.run", resource="backup", source="replica-a", patient_index=None),
        entry(action="records.list", source="unix:/run/medvault.sock"),
    )


def test_fhir_exports_parse_as_r4_audit_events_with_r4_codes() -> None:
    # fhir.resources (R4B, whose AuditEvent is R4's) is an independent reading of the spec.
    for line in joined(export.to_fhir(all_kinds())).decode("utf-8").splitlines():
        resource = AuditEvent.model_validate_json(line)
        assert resource.type.system == export.DCM
        assert resource.type.code in R4_AUDIT_EVENT_TYPES
        assert resource.outcome in R4_OUTCOMES
        assert resource.action in R4_ACTIONS
        network = resource.agent[0].network
        if network is not None:
            assert network.type in R4_NETWORK_TYPES


def test_fhir_grants_and_break_glass_are_security_alerts_with_dicom_subtypes() -> None:
    resources = fhir(all_kinds())
    glass, grant = resources[3], resources[8]
    assert glass["type"]["code"] == grant["type"]["code"] == "110113"
    assert glass["subtype"] == [
        {"system": export.DCM, "code": "110127", "display": "Emergency Override Started"},
        {"system": export.ACTION_SYSTEM, "code": "access.break_glass"},
    ]
    assert grant["subtype"][0] == {
        "system": export.DCM, "code": "110136", "display": "Security Roles Changed"
    }
    assert resources[0]["subtype"] == [{"system": export.ACTION_SYSTEM, "code": "records.read"}]


def test_fhir_network_addresses() -> None:
    resources = fhir(all_kinds())
    assert resources[8]["agent"][0]["network"] == {"address": "::1", "type": "2"}
    assert resources[9]["agent"][0]["network"] == {"address": "replica-a", "type": "1"}
    assert "network" not in resources[10]["agent"][0]


@pytest.mark.parametrize(("source", "address"), [
    ("ipv4:127.0.0.1:5555", "127.0.0.1"),
    ("ipv4:10.0.0.7", "10.0.0.7"),
    ("ipv6:[::1]:5555", "::1"),
    ("ipv6:[fe80::1]", "fe80::1"),
    ("ipv6:[2001:db8::7]:443", "2001:db8::7"),
    ("127.0.0.1", "127.0.0.1"),
    ("unix:/run/x.sock", None),
    ("unknown", None),
    ("replica-a", None),
    ("", None),
])  # fmt: skip
def test_ip_address_of(source: str, address: str | None) -> None:
    assert export.ip_address_of(source) == address
