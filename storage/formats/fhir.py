"""FHIR R4 JSON: strict JSON, a known resourceType, and a patient that is the header's.

The JSON is parsed whole by the standard library, so it is capped at ``MAX_BYTES``
(larger FHIR content is refused: attach large documents as PDF or CDA records). It
must be UTF-8 (FHIR R4, 2.6.2), with no duplicate names and no NaN/Infinity.

How the patient is matched (each must hold, see docs/formats.md):
- a ``Patient``: one of its ``identifier`` entries (system + value);
- a resource with ``subject`` (or ``patient``): the reference's ``identifier``, else the
  ``Patient`` it points at: ``#id`` in ``contained``, or, inside a Bundle, the entry whose
  ``fullUrl`` or ``Patient/id`` the reference names;
- a ``Bundle``: every entry resource that is a Patient or names one; at least one must.
"""

from __future__ import annotations

import json
from typing import Any

from storage.formats.base import mismatch, names_other, refuse, same_patient
from storage.index import (
    CODE,
    DATE,
    DOCUMENT_CODE,
    OBSERVATION,
    RESOURCE_TYPE,
    IndexEntry,
    bounded,
    day,
    entry,
    instant,
    number,
)
from storage.model import PatientRef

MAX_BYTES = 8 << 20
# Parsed JSON costs ~30x its size when it is all small values (8 MiB of "{}," was
# ~230 MiB and seconds); every value but the first follows one of these bytes, so
# counting them (in strings too: an over-count) bounds the objects json.loads makes.
MAX_TOKENS = 250_000
_TOKENS = b"{[,:"
RESOURCE_TYPES = frozenset({
    "Bundle", "DocumentReference", "DiagnosticReport", "Observation", "Patient",
    "Composition", "ImagingStudy", "Condition", "Procedure", "Encounter",
    "AllergyIntolerance", "Immunization", "MedicationRequest", "ServiceRequest",
})  # fmt: skip
_SUBJECT_FIELDS = ("subject", "patient")
# Where a resource gives its code, and what the code means for search: the kind of a
# document, an observation, or another code.
_DOCUMENT_CODES = {"DocumentReference": "type", "Composition": "type",
                   "DiagnosticReport": "code"}
_DATES = ("effectiveDateTime", "issued", "date", "authoredOn", "recordedDate",
          "onsetDateTime", "occurrenceDateTime", "started")
Json = dict[str, Any]


class FhirValidator:
    """One FHIR R4 resource (or Bundle) about the header's patient."""

    def __init__(self, patient: PatientRef) -> None:
        self._patient = patient
        self._data = bytearray()
        self._tokens = 0
        self._index: list[IndexEntry] = []

    def feed(self, chunk: bytes) -> None:
        """Buffer up to the caps (bytes, and values as counted by their separators)."""
        if len(self._data) + len(chunk) > MAX_BYTES:
            raise refuse(f"FHIR: JSON larger than {MAX_BYTES} bytes is not accepted")
        self._tokens += sum(chunk.count(c) for c in _TOKENS)
        if self._tokens > MAX_TOKENS:
            raise refuse(f"FHIR: JSON with more than {MAX_TOKENS} values is not accepted")
        self._data += chunk

    def finish(self) -> None:
        """Parse strictly, then check the resource and its patient."""
        resource = _parse(bytes(self._data))
        self._data = bytearray()
        kind = resource.get("resourceType")
        if not isinstance(kind, str) or kind not in RESOURCE_TYPES:  # an object: unhashable
            raise refuse("FHIR: resourceType is missing or not an accepted R4 resource")
        entries = _bundle_entries(resource) if kind == "Bundle" else [(None, resource)]
        index = {key: r for full_url, r in entries for key in _keys(full_url, r)}
        claims = 0
        for _, item in entries:
            for identifiers in _claims(item, index):
                claims += 1
                if not self._any_matches(identifiers):
                    raise mismatch("patient identifier (system + value)")
        if not claims:
            raise refuse("FHIR: no Patient identifier or subject/patient reference names "
                         "the patient")
        self._check_nested(resource)
        self._index = bounded(
            e for r in [resource, *(r for _, r in entries if r is not resource)]
            for e in _entries(r)
        )

    def index(self) -> list[IndexEntry]:
        """resourceType of the resource and of each Bundle entry, their codes (document
        codes, observation codes, others) and the clinical date."""
        return self._index

    def _check_nested(self, resource: Json) -> None:
        """Every Patient, and every ``subject``/``patient`` identifier, anywhere in the
        content (``contained``, a Bundle inside a Bundle, any extension) names the
        header's patient: a record must not carry another patient's resources."""
        stack: list[Any] = [resource]
        while stack:
            value = stack.pop()
            if isinstance(value, list):
                stack.extend(value)
            elif isinstance(value, dict):
                if "resourceType" in value:
                    for identifiers in _claims(value, {}, resolve=False):
                        if not self._any_matches(identifiers):
                            raise mismatch("patient identifier (system + value)")
                stack.extend(value.values())

    def _any_matches(self, identifiers: list[Any]) -> bool:
        """One identifier is the header patient's, none another's in its authority."""
        pairs = [
            (i["value"], i["system"]) for i in identifiers
            if isinstance(i, dict) and isinstance(i.get("value"), str)
            and isinstance(i.get("system"), str)
        ]  # fmt: skip
        if any(names_other(self._patient, value, [system]) for value, system in pairs):
            return False
        return any(same_patient(self._patient, value, [system]) for value, system in pairs)


def _entries(resource: Json) -> list[IndexEntry | None]:
    kind = resource.get("resourceType")
    found = [entry(RESOURCE_TYPE, kind if isinstance(kind, str) else None)]
    if kind == "Observation":
        field, element = OBSERVATION, "code"
    elif isinstance(kind, str) and kind in _DOCUMENT_CODES:
        field, element = DOCUMENT_CODE, _DOCUMENT_CODES[kind]
    else:
        field, element = CODE, "code"
    quantity = resource.get("valueQuantity") if kind == "Observation" else None
    value, unit = (quantity.get("value"), quantity.get("unit") or quantity.get("code")) \
        if isinstance(quantity, dict) else (None, None)
    value = number(value)  # in clear only as a number and a timestamp (storage.index)
    observed = instant(resource.get("effectiveDateTime"))
    for coding in _codings(resource.get(element)):
        found.append(entry(field, coding.get("code"), coding.get("system"),
                           quantity=value, unit=unit, observed_at=observed))
    for name in _DATES:
        date = day(resource.get(name)) if isinstance(resource.get(name), str) else None
        if date:
            found.append(entry(DATE, date))
            break
    return found


def _codings(concept: Any) -> list[Json]:
    """The codings of a CodeableConcept that have a string code."""
    codings = concept.get("coding") if isinstance(concept, dict) else None
    if not isinstance(codings, list):
        return []
    return [c for c in codings if isinstance(c, dict) and isinstance(c.get("code"), str)]


def _parse(data: bytes) -> Json:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> Json:
        names = [k for k, _ in pairs]
        if len(set(names)) != len(names):
            raise refuse("FHIR: a JSON object has a duplicate name")
        return dict(pairs)

    def no_constant(_: str) -> None:
        raise refuse("FHIR: NaN and Infinity are not JSON")

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise refuse("FHIR: is not UTF-8") from e
    try:
        value = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:
        raise refuse("is not FHIR JSON: not valid JSON (or nested too deeply)") from e
    if not isinstance(value, dict):
        raise refuse("is not FHIR JSON: not a JSON object")
    return value


def _bundle_entries(bundle: Json) -> list[tuple[str | None, Json]]:
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise refuse("FHIR: Bundle.entry is not an array")
    found: list[tuple[str | None, Json]] = []
    for item in entries:
        resource = item.get("resource") if isinstance(item, dict) else None
        if isinstance(resource, dict):
            url = item.get("fullUrl")
            found.append((url if isinstance(url, str) else None, resource))
    return found


def _keys(full_url: str | None, resource: Json) -> list[str]:
    """The references by which a Bundle entry can be named."""
    keys = [full_url] if full_url else []
    if isinstance(resource.get("id"), str):
        keys.append(f"{resource.get('resourceType')}/{resource['id']}")
    return keys


def _claims(resource: Json, index: dict[str, Json], *, resolve: bool = True) -> list[list[Any]]:
    """Each patient this resource names, as that patient's list of identifiers (without
    ``resolve``, only those its ``subject``/``patient`` give as an identifier)."""
    if resource.get("resourceType") == "Patient":
        identifiers = resource.get("identifier")
        if not isinstance(identifiers, list) or not identifiers:
            raise refuse("FHIR: a Patient has no identifier")
        return [identifiers]
    claims = []
    for name in _SUBJECT_FIELDS:
        reference = resource.get(name)
        if isinstance(reference, dict) and (resolve or "identifier" in reference):
            claims.append(_identifiers_of(name, reference, resource, index))
    return claims


def _identifiers_of(name: str, reference: Json, resource: Json,
                    index: dict[str, Json]) -> list[Any]:
    if isinstance(reference.get("identifier"), dict):
        return [reference["identifier"]]
    target = reference.get("reference")
    patient: Any = None
    if isinstance(target, str) and target.startswith("#"):
        contained = resource.get("contained")
        patient = next((r for r in contained if isinstance(r, dict)
                        and r.get("id") == target[1:]), None) if isinstance(
            contained, list) else None
    elif isinstance(target, str):
        patient = index.get(target)
    if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
        raise refuse(f"FHIR: {name} cannot be matched to the header patient: give "
                     f"{name}.identifier or include the Patient it references")
    identifiers = patient.get("identifier")
    return identifiers if isinstance(identifiers, list) else []
