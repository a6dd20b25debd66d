"""Audit events as JSON lines, CSV, or NDJSON of FHIR R4 AuditEvent resources.

Every exporter is a generator of ``bytes``, one event at a time, so an export of any
size runs in bounded memory; :func:`chunked` groups the pieces into stream messages.

JSON lines (``to_jsonl``): one object per line with the canonical fields of
``storage.audit_model`` (same names and text forms) plus ``prev_hash`` and ``hash`` in
lowercase hex. It is the faithful format: re-encoding a line canonically and hashing
it reproduces the chain, so a verifier outside medvault can check an export.

CSV (``to_csv``): a header row, then one row per event, the columns of ``FIELDS``.
Cells starting with ``= + - @``, tab or carriage return get a leading ``'`` so a
spreadsheet never runs them as formulas (break-the-glass reasons are free text typed
by users). Such cells then differ from the hashed value; verify with JSON lines.

FHIR (``to_fhir``): NDJSON, one R4 ``AuditEvent`` per line, as in FHIR bulk data.

* ``type``: a DICOM audit event ID (``DCM``) of the R4 ``audit-event-type`` value set,
  from ``FHIR_EVENT_TYPES`` by action; events denied at authentication are 110114 User
  Authentication, anything unknown 110100 Application Activity. ``subtype`` keeps
  medvault's action (system ``urn:medvault:action``), after the DICOM event type code
  of ``FHIR_EVENT_SUBTYPES`` when there is one: grants and break-the-glass are 110113
  Security Alert with subtype 110136 Security Roles Changed or 110127 Emergency
  Override Started (DICOM CID 403; 110136 is not an event ID, so it cannot be the type).
* ``action``: C for records.write, R for records.read / records.stat, E otherwise.
* ``outcome``: 0 allowed, 4 denied (minor failure), 8 failed (serious failure);
  ``outcomeDesc`` is the status code and the reason of a denial or failure.
* ``purposeOfEvent[0].text``: the reason of an allowed event (``break-the-glass grant
  <id>`` for a read through break-the-glass; never the clinician's reason or a review
  comment, which stay sealed with the grant).
* ``agent[0]``: the principal (``requestor``), its roles as ``role[].text`` and its
  network address: a bare IP address (type 2) from gRPC's peer string
  (``ipv4:10.0.0.7:51234`` -> ``10.0.0.7``, ``ipv6:[::1]:5000`` -> ``::1``), or a
  machine name (type 1) for events a replica writes under its host name; none for
  other peers (``unix:``). ``agent[1]``: the delegating application, when present.
* ``source.observer.display``: ``medvault``.
* ``entity``: the resource touched (``what.identifier.value``), and the patient as its
  blind index only (system ``urn:medvault:patient-index``), never the identifier.
* ``extension``: ``urn:medvault:audit-chain`` with sub-extensions ``sequence``,
  ``prevHash`` and ``hash`` (``valueString``; decimal and lowercase hex), so each
  resource can be matched to its place in the verified chain.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Final

from storage import ChainedEvent, event_document, format_time

FIELDS: Final = (
    "sequence", "time", "principal", "application", "role", "action", "resource",
    "patient_index", "outcome", "status", "reason", "source", "prev_hash", "hash",
)  # fmt: skip

DCM: Final = "http://dicom.nema.org/resources/ontology/DCM"
PATIENT_INDEX_SYSTEM: Final = "urn:medvault:patient-index"
ACTION_SYSTEM: Final = "urn:medvault:action"
CHAIN_EXTENSION: Final = "urn:medvault:audit-chain"
UNAUTHENTICATED: Final = "unauthenticated"  # the principal name of a failed authentication
_ENTITY_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE: Final = "http://terminology.hl7.org/CodeSystem/object-role"
_SOURCE_TYPE: Final = "http://terminology.hl7.org/CodeSystem/security-source-type"

PATIENT_RECORD: Final = ("110110", "Patient Record")
AUDIT_LOG_USED: Final = ("110101", "Audit Log Used")
QUERY: Final = ("110112", "Query")
SECURITY_ALERT: Final = ("110113", "Security Alert")
USER_AUTHENTICATION: Final = ("110114", "User Authentication")
APPLICATION_ACTIVITY: Final = ("110100", "Application Activity")
SECURITY_ROLES_CHANGED: Final = ("110136", "Security Roles Changed")
EMERGENCY_OVERRIDE_STARTED: Final = ("110127", "Emergency Override Started")

# medvault action -> DICOM audit event ID (the R4 audit-event-type value set). Grants
# and break-the-glass change who may see a patient: a Security Alert, told apart by
# their subtype below; listing grants or one's own identity is a query.
FHIR_EVENT_TYPES: Mapping[str, tuple[str, str]] = MappingProxyType({
    "records.write": PATIENT_RECORD,
    "records.read": PATIENT_RECORD,
    "records.stat": PATIENT_RECORD,
    "records.list": QUERY,
    "access.grant": SECURITY_ALERT,
    "access.break_glass": SECURITY_ALERT,
    "access.list": QUERY,
    "access.whoami": QUERY,
    "audit.query": AUDIT_LOG_USED,
    "audit.verify": AUDIT_LOG_USED,
    "audit.export": AUDIT_LOG_USED,
    "audit.review": AUDIT_LOG_USED,
    "incident": SECURITY_ALERT,
})  # fmt: skip

# medvault action -> DICOM Security Alert event type code (CID 403), the first subtype.
FHIR_EVENT_SUBTYPES: Mapping[str, tuple[str, str]] = MappingProxyType({
    "access.grant": SECURITY_ROLES_CHANGED,
    "access.break_glass": EMERGENCY_OVERRIDE_STARTED,
})  # fmt: skip

FHIR_ACTIONS: Mapping[str, str] = MappingProxyType(
    {"records.write": "C", "records.read": "R", "records.stat": "R"}
)
FHIR_OUTCOMES: Mapping[str, str] = MappingProxyType({"allowed": "0", "denied": "4", "failed": "8"})
_CSV_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")


def event_fields(event: ChainedEvent) -> dict[str, Any]:
    """The event as a flat dict of ``FIELDS``: canonical text forms, hashes in hex."""
    return {
        **event_document(event.sequence, event.entry),
        "prev_hash": event.prev_hash.hex(),
        "hash": event.hash.hex(),
    }


def _json_line(document: Mapping[str, Any]) -> bytes:
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    return (text + "\n").encode("utf-8")


def to_jsonl(events: Iterable[ChainedEvent]) -> Iterator[bytes]:
    """One JSON object per event and line (UTF-8)."""
    for event in events:
        yield _json_line(event_fields(event))


def _csv_cell(value: object) -> str:
    if value is None:
        return ""
    text = str(value)
    return "'" + text if text.startswith(_CSV_FORMULA_START) else text


def to_csv(events: Iterable[ChainedEvent]) -> Iterator[bytes]:
    """A header row, then one row per event (RFC 4180 quoting, CRLF line ends, UTF-8)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def flush() -> bytes:
        data = buffer.getvalue().encode("utf-8")
        buffer.seek(0)
        buffer.truncate()
        return data

    writer.writerow(FIELDS)
    yield flush()
    for event in events:
        fields = event_fields(event)
        writer.writerow([_csv_cell(fields[name]) for name in FIELDS])
        yield flush()


def fhir_event_type(event: ChainedEvent) -> tuple[str, str]:
    """The DICOM event type (code, display) of ``event``; see ``FHIR_EVENT_TYPES``."""
    entry = event.entry
    if entry.outcome == "denied" and (
        entry.status == "UNAUTHENTICATED" or entry.principal == UNAUTHENTICATED
    ):
        return USER_AUTHENTICATION
    return FHIR_EVENT_TYPES.get(entry.action, APPLICATION_ACTIVITY)


def ip_address_of(source: str) -> str | None:
    """The bare IP address in a gRPC peer string, or None if it holds none.

    ``ipv4:10.0.0.7:51234`` -> ``10.0.0.7``; ``ipv6:[::1]:5000`` -> ``::1``;
    ``ipv4:10.0.0.7`` (a peer kept without its port) -> ``10.0.0.7``; a host name,
    ``unix:...`` or ``unknown`` -> None.
    """
    rest = source.removeprefix("ipv4:").removeprefix("ipv6:")
    if rest.startswith("["):
        rest = rest[1:].partition("]")[0]
    for candidate in (rest, rest.rpartition(":")[0]):
        try:
            return str(ipaddress.ip_address(candidate))
        except ValueError:
            continue
    return None


def _network(source: str) -> dict[str, str] | None:
    """``agent.network``: type 2 (IP address) or 1 (machine name), None for neither."""
    address = ip_address_of(source)
    if address is not None:
        return {"address": address, "type": "2"}
    if source and source != "unknown" and ":" not in source and "/" not in source:
        return {"address": source, "type": "1"}  # a replica's host name
    return None


def _agents(event: ChainedEvent) -> list[dict[str, Any]]:
    entry = event.entry
    person: dict[str, Any] = {"who": {"identifier": {"value": entry.principal}}, "requestor": True}
    roles = [role for role in entry.role.split(",") if role]
    if roles:
        person["role"] = [{"text": role} for role in roles]
    network = _network(entry.source)
    if network is not None:
        person["network"] = network
    agents = [person]
    if entry.application:
        agents.append({
            "who": {"identifier": {"value": entry.application}},
            "requestor": False,
            "role": [{"coding": [{"system": DCM, "code": "110150", "display": "Application"}]}],
        })  # fmt: skip
    return agents


def _entities(event: ChainedEvent) -> list[dict[str, Any]]:
    entry = event.entry
    entities: list[dict[str, Any]] = []
    if entry.resource:
        entities.append({
            "what": {"identifier": {"value": entry.resource}},
            "type": {"system": _ENTITY_TYPE, "code": "2", "display": "System Object"},
        })  # fmt: skip
    if entry.patient_index is not None:
        entities.append({
            "what": {"identifier": {
                "system": PATIENT_INDEX_SYSTEM, "value": entry.patient_index.hex(),
            }},
            "type": {"system": _ENTITY_TYPE, "code": "1", "display": "Person"},
            "role": {"system": _OBJECT_ROLE, "code": "1", "display": "Patient"},
        })  # fmt: skip
    return entities


def _chain_extension(event: ChainedEvent) -> dict[str, Any]:
    return {
        "url": CHAIN_EXTENSION,
        "extension": [
            {"url": "sequence", "valueString": str(event.sequence)},
            {"url": "prevHash", "valueString": event.prev_hash.hex()},
            {"url": "hash", "valueString": event.hash.hex()},
        ],
    }


def _subtypes(action: str) -> list[dict[str, str]]:
    subtypes = [{"system": ACTION_SYSTEM, "code": action}]
    if action in FHIR_EVENT_SUBTYPES:
        code, display = FHIR_EVENT_SUBTYPES[action]
        subtypes.insert(0, {"system": DCM, "code": code, "display": display})
    return subtypes


def fhir_audit_event(event: ChainedEvent) -> dict[str, Any]:
    """One FHIR R4 AuditEvent resource (as a JSON-ready dict); see the module docstring."""
    entry = event.entry
    code, display = fhir_event_type(event)
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"medvault-audit-{event.sequence}",
        "extension": [_chain_extension(event)],
        "type": {"system": DCM, "code": code, "display": display},
        "subtype": _subtypes(entry.action),
        "action": FHIR_ACTIONS.get(entry.action, "E"),
        "recorded": format_time(entry.time),
        "outcome": FHIR_OUTCOMES[entry.outcome],
    }
    if entry.outcome != "allowed" and (entry.status or entry.reason):
        resource["outcomeDesc"] = ": ".join(part for part in (entry.status, entry.reason) if part)
    elif entry.reason:
        resource["purposeOfEvent"] = [{"text": entry.reason}]
    resource["agent"] = _agents(event)
    resource["source"] = {
        "observer": {"display": "medvault"},
        "type": [{"system": _SOURCE_TYPE, "code": "4", "display": "Application Server"}],
    }
    entities = _entities(event)
    if entities:
        resource["entity"] = entities
    return resource


def to_fhir(events: Iterable[ChainedEvent]) -> Iterator[bytes]:
    """NDJSON: one FHIR R4 AuditEvent per line (UTF-8)."""
    for event in events:
        yield _json_line(fhir_audit_event(event))


EXPORTERS: Mapping[str, Callable[[Iterable[ChainedEvent]], Iterator[bytes]]] = MappingProxyType(
    {"jsonl": to_jsonl, "csv": to_csv, "fhir": to_fhir}
)


def chunked(pieces: Iterable[bytes], size: int = 64 << 10) -> Iterator[bytes]:
    """Regroup ``pieces`` into chunks of about ``size`` bytes (the last may be smaller)."""
    if size < 1:
        raise ValueError("chunk size must be positive")
    pending: list[bytes] = []
    length = 0
    for piece in pieces:
        pending.append(piece)
        length += len(piece)
        if length >= size:
            yield b"".join(pending)
            pending, length = [], 0
    if pending:
        yield b"".join(pending)
