"""HL7 v2, CDA, FHIR and PDF: what each checks, and hostile input."""

from __future__ import annotations

import json

import pytest

from storage.errors import InvalidRecordError
from storage.formats import cda, fhir, hl7v2
from storage.model import RecordKind
from tests import content
from tests.unit.storage.formats.helpers import PATIENT, refused, run

ID, AUTH = PATIENT.id, PATIENT.authority
BOMB = ('<!DOCTYPE ClinicalDocument [<!ENTITY a "aaaaaaaaaa">'
        + "".join(f'<!ENTITY {c} "{("&" + p + ";") * 10}">'
                  for p, c in zip("abcdefgh", "bcdefghi", strict=True)) + "]>\n")
XXE = '<!DOCTYPE ClinicalDocument [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n'


# --- HL7 v2 -------------------------------------------------------------------------

def test_hl7_line_feeds_and_a_large_obx_after_pid() -> None:
    run(RecordKind.HL7V2, content.hl7v2(ID, AUTH, sep="\n"))
    big = content.hl7v2(ID, AUTH) + b"OBX|2|ED|PDF^Report||" + b"A" * (3 << 20) + b"\r"
    run(RecordKind.HL7V2, big, chunk=1 << 18)


@pytest.mark.parametrize(("change", "named"), [
    (lambda m: m.replace(b"|MSG00001|", b"||"), "MSH-10"),
    (lambda m: m.replace(b"ORU^R01^ORU_R01", b"X"), "MSH-9"),
    (lambda m: m.replace(b"MSH|^~\\&|", b"MSH|^^^^|"), "encoding characters"),
    (lambda m: m.replace(b"^^^HOSP&2.999.42.1&ISO^MR", b"^^^^MR"), "CX.4"),
    (lambda m: m.replace(b"|2.5.1", b"|2.5.1||||||UNICODE UTF-16"), "MSH-18"),
    (lambda m: m.replace(b"SYNTHETIC", b"SYNTH\xff\xfe"), "utf-8"),
    (lambda m: m.replace(b"\rPID", b"\rPV1"), "PID"),
])
def test_hl7_refusals_name_the_field(change: object, named: str) -> None:
    message = change(content.hl7v2(ID, AUTH))  # type: ignore[operator]
    assert named in refused(RecordKind.HL7V2, message)


def test_hl7_latin1_with_msh18_and_a_second_identifier() -> None:
    message = content.hl7v2(ID, AUTH).replace(b"|2.5.1", b"|2.5.1||||||8859/1")
    message = message.replace(b"SYNTHETIC", b"M\xfcLLER")
    message = message.replace(b"^MR|", b"^MR~X9^^^OTHER^PI|")  # one of two matches
    run(RecordKind.HL7V2, message)


def test_hl7_pid_beyond_the_cap_is_refused() -> None:
    message = content.hl7v2(ID, AUTH)
    pid = message.index(b"PID")
    filler = b"NTE|1||" + b"x" * hl7v2.HEADER_CAP + b"\r"
    assert "PID" in refused(RecordKind.HL7V2, message[:pid] + filler + message[pid:])


# --- CDA ----------------------------------------------------------------------------

@pytest.mark.parametrize("prolog", [BOMB, XXE])
def test_cda_with_a_doctype_is_refused(prolog: str) -> None:
    problem = refused(RecordKind.CDA, content.cda(ID, AUTH, prolog=prolog,
                                                 body="<text>&i;&x;</text>"))
    assert "DOCTYPE" in problem or "well-formed" in problem, problem


def test_cda_external_entity_without_doctype_is_not_well_formed() -> None:
    assert "well-formed" in refused(RecordKind.CDA, content.cda(ID, AUTH, body="&x;"))


@pytest.mark.parametrize(("change", "named"), [
    (lambda d: d.replace(b'xmlns="urn:hl7-org:v3"', b'xmlns="urn:other"'), "ClinicalDocument"),
    (lambda d: d.replace(b'<code code="18842-5"', b'<kode code="18842-5"'), "code"),
    (lambda d: d.replace(b"effectiveTime", b"effectiveTimes"), "effectiveTime"),
    (lambda d: d.replace(b"<recordTarget>", b"<recordTarget><x/>", 1)
     .replace(b"<patientRole><id", b"<patientRole><idx"), "recordTarget"),
    (lambda d: d.replace(b"Discharge", b"Disch\xffarge"), "well-formed"),
    (lambda d: d.replace(b"</recordTarget>", b"</recordTarget><recordTarget><patientRole>"
                         b'<id root="2.999.42.1" extension="T9"/></patientRole></recordTarget>'),
     "does not match"),
])
def test_cda_refusals_name_the_field(change: object, named: str) -> None:
    document = change(content.cda(ID, AUTH))  # type: ignore[operator]
    assert named in refused(RecordKind.CDA, document)


def test_cda_header_beyond_the_cap_is_refused_and_a_large_body_is_not() -> None:
    title = b"<title>" + b"t" * (2 * cda.HEADER_CAP) + b"</title>"
    late = content.cda(ID, AUTH).replace(b"<title>Discharge summary</title>", title)
    assert "first" in refused(RecordKind.CDA, late)
    body = "<component><section><text>note</text></section></component>" * 40_000
    run(RecordKind.CDA, content.cda(ID, AUTH, body=body), chunk=1 << 18)


# --- FHIR ---------------------------------------------------------------------------

IDENT = {"system": AUTH, "value": ID}


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


def test_fhir_patient_bundle_and_contained() -> None:
    run(RecordKind.FHIR, _json({"resourceType": "Patient", "identifier": [IDENT]}))
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:p1", "resource": {"resourceType": "Patient",
                                                "identifier": [IDENT]}},
        {"resource": {"resourceType": "DiagnosticReport", "status": "final",
                      "subject": {"reference": "urn:uuid:p1"}}},
        {"resource": {"resourceType": "Organization", "name": "Lab"}},
    ]}
    run(RecordKind.FHIR, _json(bundle))
    contained = {"resourceType": "DocumentReference", "status": "current",
                 "contained": [{"resourceType": "Patient", "id": "p",
                                "identifier": [IDENT]}],
                 "subject": {"reference": "#p"}}
    run(RecordKind.FHIR, _json(contained))


@pytest.mark.parametrize(("data", "named"), [
    (_json({"resourceType": "Bundle", "entry": [
        {"resource": {"resourceType": "Patient", "identifier": [IDENT]}},
        {"resource": {"resourceType": "Observation",
                      "subject": {"identifier": {"system": AUTH, "value": "T9"}}}}]}),
     "does not match"),
    (_json({"resourceType": "Observation", "subject": {"reference": "Patient/1"}}),
     "subject.identifier"),
    (_json({"resourceType": "Observation", "status": "final"}), "names the patient"),
    (_json({"resourceType": "Basic", "subject": {"identifier": IDENT}}), "resourceType"),
    (_json({"resourceType": "Patient"}), "identifier"),
    (b'{"resourceType": "Patient", "resourceType": "Patient"}', "duplicate"),
    (b'{"resourceType": "Observation", "valueQuantity": {"value": NaN}}', "NaN"),
    (b"[" * 100_000 + b"]" * 100_000, "JSON"),
    (b'{"resourceType": "Patient\xff"}', "UTF-8"),
    (b"[]", "JSON object"),
])
def test_fhir_refusals_name_the_problem(data: bytes, named: str) -> None:
    assert named in refused(RecordKind.FHIR, data)


def test_fhir_beyond_the_cap_is_refused() -> None:
    assert "larger" in refused(RecordKind.FHIR, b" " * (fhir.MAX_BYTES + 1))


# --- PDF ----------------------------------------------------------------------------

def test_pdf_large_and_with_a_cross_reference_stream() -> None:
    run(RecordKind.PDF, content.pdf(filler=bytes(3 << 20)), chunk=1 << 16)
    body = b"%PDF-1.5\n1 0 obj\n<< /Type /Catalog >>\nendobj\n"
    xref = len(body)
    body += b"2 0 obj\n<< /Type /XRef /Size 3 /Root 1 0 R >>\nstream\n\nendstream\nendobj\n"
    run(RecordKind.PDF, body + b"startxref\n%d\n%%%%EOF\n" % xref)


@pytest.mark.parametrize(("change", "named"), [
    (lambda p: b" " + p, "%PDF"),
    (lambda p: p.replace(b"%%EOF", b"%%EOX"), "startxref"),
    (lambda p: p[: p.rindex(b"startxref")] + b"startxref\n99999999\n%%EOF\n", "outside"),
    (lambda p: p[: p.rindex(b"startxref")] + b"startxref\n20\n%%EOF\n", "cross-reference"),
    (lambda p: p.replace(b"trailer", b"trailor"), "trailer"),
])
def test_pdf_refusals_name_the_problem(change: object, named: str) -> None:
    assert named in refused(RecordKind.PDF, change(content.pdf()))  # type: ignore[operator]


# --- HL7 v2: hostile messages (attack review) ---------------------------------------

def test_hl7_separator_floods_before_or_in_pid_are_cheap() -> None:
    """A 1 MiB segment of separators before PID cost ~430 MiB and seconds when every
    segment up to PID was parsed; only MSH and PID are parsed now, and their delimiters
    are capped (many PID-3 repetitions times many segments was quadratic)."""
    message = content.hl7v2(ID, AUTH)
    pid = message.index(b"PID")
    fields, components = b"|" * (hl7v2.HEADER_CAP - 4096), b"^&~" * 340_000
    for filler in (b"NTE" + fields + b"\r", b"NTE|" + components + b"\r"):
        run(RecordKind.HL7V2, message[:pid] + filler + message[pid:])
    reps = (f"{ID}^^^&2.999.42.1&ISO~" * 3000).encode()
    flood = message[:pid] + b"Z\r" * 60_000 + b"PID|1||" + reps + b"\r"
    assert "PID has more than" in refused(RecordKind.HL7V2, flood)


def test_hl7_a_pid_like_segment_is_not_an_internal_error() -> None:
    message = content.hl7v2(ID, AUTH).replace(b"\rPID|", b"\rPIDX|")
    assert "no PID segment" in refused(RecordKind.HL7V2, message)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 16])
def test_hl7_a_second_patient_is_refused(chunk: int) -> None:
    """An ORU may carry several patients' results: the record would be filed under the
    first PID while holding another patient's data."""
    second = f"PID|1||T0418^^^HOSP&{AUTH[8:]}&ISO^MR\rOBX|1|NM|718-7||9|g/dL\r".encode()
    message = content.hl7v2(ID, AUTH) + second
    assert "more than one PID" in refused(RecordKind.HL7V2, message, chunk=chunk)


def test_hl7_another_identifier_in_the_header_authority_is_a_mismatch() -> None:
    other = f"^MR~T0418^^^HOSP&{AUTH[8:]}&ISO^PI|".encode()
    message = content.hl7v2(ID, AUTH).replace(b"^MR|", other)
    assert "PID-3" in refused(RecordKind.HL7V2, message)


# --- FHIR: hostile JSON (attack review) ---------------------------------------------

def test_fhir_many_small_values_are_refused_before_parsing() -> None:
    """8 MiB of ``{},`` parsed to ~230 MiB of objects in seconds; the values are counted
    as the bytes arrive, so the buffer is refused before json.loads sees it."""
    head = b'{"resourceType": "Patient", "identifier": [' + _json(IDENT) + b'], "x": ['
    for item in (b"{},", b"[],", b"1e9999,", b'"",'):
        data = head + item * (fhir.MAX_TOKENS + 1) + b"0]}"
        assert "values" in refused(RecordKind.FHIR, data)


OTHER = {"system": AUTH, "value": "T0418"}


@pytest.mark.parametrize("resource", [
    {"resourceType": "Bundle", "type": "collection", "entry": [  # a Bundle in a Bundle
        {"resource": {"resourceType": "Patient", "identifier": [IDENT]}},
        {"resource": {"resourceType": "Bundle", "entry": [
            {"resource": {"resourceType": "Patient", "identifier": [OTHER]}}]}}]},
    {"resourceType": "Observation", "subject": {"identifier": IDENT},  # unreferenced
     "contained": [{"resourceType": "Patient", "identifier": [OTHER]}]},
    {"resourceType": "DiagnosticReport", "subject": {"identifier": IDENT},
     "contained": [{"resourceType": "Observation", "subject": {"identifier": OTHER}}]},
    {"resourceType": "Patient", "identifier": [IDENT, OTHER]},  # two in one authority
])
def test_fhir_another_patient_anywhere_is_a_mismatch(resource: dict[str, object]) -> None:
    assert "does not match" in refused(RecordKind.FHIR, _json(resource))


# --- CDA: hostile XML (attack review) ------------------------------------------------

def _cda_with(where: bytes, extra: bytes) -> bytes:
    document = content.cda(ID, AUTH)
    at = document.index(where) + len(where)
    return document[:at] + extra + document[at:]


@pytest.mark.parametrize("where", [b"<ClinicalDocument", b"<structuredBody"])
@pytest.mark.parametrize("attribute", [b' a%d="x"', b' xmlns:n%d="urn:x"'])
def test_cda_an_element_with_very_many_attributes_is_refused(where: bytes,
                                                             attribute: bytes) -> None:
    """libxml2 holds a whole start tag: 11 MiB of attributes took ~400 MiB (in the body,
    after the header cap, there was no bound at all)."""
    flood = b"".join(attribute % k for k in range(cda.MAX_ATTRIBUTES + 1))
    assert "attributes" in refused(RecordKind.CDA, _cda_with(where, flood), chunk=4096)


@pytest.mark.parametrize("encoding", ["UTF-7", "UTF-16", "IBM037", "UTF-32"])
def test_cda_in_an_encoding_other_readers_decode_differently_is_refused(encoding: str) -> None:
    document = content.cda(ID, AUTH)
    body = document[document.index(b"<ClinicalDocument") :].decode()
    data = f'<?xml version="1.0" encoding="{encoding}"?>\n{body}'.encode(
        encoding if encoding != "UTF-7" else "ascii")
    assert "UTF-8" in refused(RecordKind.CDA, data)


def test_cda_a_second_id_in_the_header_authority_is_a_mismatch() -> None:
    second = f'<id root="{AUTH[8:]}" extension="T0418"/>'.encode()
    assert "does not match" in refused(RecordKind.CDA, _cda_with(b"<patientRole>", second))


def test_cda_equals_signs_in_text_are_not_attributes() -> None:
    ruler = b"<text>" + b"=" * 80 * 50 + b"</text>"
    run(RecordKind.CDA, _cda_with(b"<structuredBody>", b"<component><section>" + ruler
                                  + b"</section></component>"))


# --- found by coverage-guided fuzzing (tests/fuzz) ------------------------------------
# Each was refused only by the catch-all of ``storage.formats.checked`` ("does not parse
# as the kind it claims"): the validator itself raised another type. The assertions name
# the validator's own refusal.

@pytest.mark.parametrize("kind", [{"system": AUTH}, ["Observation"]])
def test_fhir_resource_type_that_is_not_a_string_is_refused_by_name(kind: object) -> None:
    validator = fhir.FhirValidator(PATIENT)
    validator.feed(_json({"resourceType": kind, "status": "final"}))
    with pytest.raises(InvalidRecordError, match="resourceType is missing"):
        validator.finish()
