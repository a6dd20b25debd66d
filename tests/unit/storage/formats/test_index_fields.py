"""What each validator indexes: the searchable fields of storage.index, per kind.

PYTEST_DONT_REWRITE: failures name fields, never content.
"""

from __future__ import annotations

import json

import pytest

from storage.formats import validator_for
from storage.index import (
    CODE,
    CONTROL_ID,
    DATE,
    DOCUMENT_CODE,
    MAX_ENTRIES,
    MESSAGE_TYPE,
    MODALITY,
    OBSERVATION,
    RESOURCE_TYPE,
    SERIES_UID,
    SOP_CLASS,
    SOP_UID,
    STUDY_UID,
    IndexEntry,
    day,
)
from storage.model import RecordKind
from tests import content
from tests.unit.storage.formats.helpers import PATIENT, refused, run

ID, AUTH = PATIENT.id, PATIENT.authority


def _fields(entries: list[IndexEntry]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for e in entries:
        found.setdefault(e.field, []).append(e.value)
    return found


def _no_patient(entries: list[IndexEntry]) -> None:
    """No index value is the patient's identifier or authority (those are blind-indexed)."""
    for e in entries:
        for value in (e.value, e.system, e.quantity, e.unit, e.observed_at):
            assert value is None or (ID not in value and AUTH not in value), e.field


@pytest.mark.parametrize("chunk", [7, 1 << 16])
def test_dicom_indexes_uids_modality_date_class(chunk: int) -> None:
    data = content.dicom(ID, AUTH, Modality="MR", StudyDate="20260214",
                         StudyInstanceUID="1.2.999.1", SeriesInstanceUID="1.2.999.1.2",
                         SOPInstanceUID="1.2.999.1.2.3", pixels=b"\0" * 4096)
    entries = run(RecordKind.DICOM, data, chunk=chunk).index()
    assert _fields(entries) == {
        STUDY_UID: ["1.2.999.1"], SERIES_UID: ["1.2.999.1.2"], SOP_UID: ["1.2.999.1.2.3"],
        SOP_CLASS: [content.CT_IMAGE], MODALITY: ["MR"], DATE: ["20260214"],
    }
    _no_patient(entries)


def test_dicom_empty_study_date_is_not_indexed() -> None:
    entries = run(RecordKind.DICOM, content.dicom(ID, AUTH, StudyDate="")).index()
    assert DATE not in _fields(entries)


@pytest.mark.parametrize("chunk", [5, 1 << 16])
@pytest.mark.parametrize("sep", ["\r", "\n", "\r\n"])
def test_hl7_oru_indexes_type_control_id_and_11073_observations(chunk: int, sep: str) -> None:
    data = content.hl7v2(ID, AUTH, control_id="CTRL42", sep=sep, obr_time="20260102103000",
                         observations=content.PCD01_OBSERVATIONS)
    entries = run(RecordKind.HL7V2, data, chunk=chunk).index()
    fields = _fields(entries)
    assert fields[MESSAGE_TYPE] == ["ORU^R01"]
    assert fields[CONTROL_ID] == ["CTRL42"]
    assert fields[DATE] == ["20260102"]  # OBR-7 before MSH-7
    assert fields[OBSERVATION] == ["150456", "MDC_PULS_OXIM_SAT_O2", "149530",
                                   "MDC_PULS_OXIM_PULS_RATE"]
    spo2 = next(e for e in entries if e.value == "150456")
    assert (spo2.system, spo2.quantity, spo2.unit, spo2.observed_at) == (
        "MDC", "97", "262688", "20260102103000"), "observation details"
    _no_patient(entries)


def test_hl7_date_falls_back_to_msh7_and_loinc_obx() -> None:
    entries = run(RecordKind.HL7V2, content.hl7v2(ID, AUTH)).index()
    fields = _fields(entries)
    assert fields[DATE] == ["20260101"]
    assert fields[OBSERVATION] == ["718-7"]
    hb = next(e for e in entries if e.field == OBSERVATION)
    assert (hb.system, hb.quantity, hb.unit) == ("LN", "13.5", "g/dL")


def test_hl7_large_obx_attachment_is_streamed_and_later_obx_indexed() -> None:
    big = "OBX|1|ED|11502-2^Lab report^LN||^AP^PDF^Base64^" + "A" * (300 << 10) + "||||||F"
    data = content.hl7v2(ID, AUTH, observations=[big, content.PCD01_OBSERVATIONS[0]])
    validator = run(RecordKind.HL7V2, data, chunk=8192)
    fields = _fields(validator.index())
    assert fields[OBSERVATION][:1] == ["11502-2"]  # code before the cut is kept
    assert "150456" in fields[OBSERVATION]
    assert all(e.quantity is None or len(e.quantity) < 100 for e in validator.index())


def test_hl7_observations_are_bounded() -> None:
    many = [f"OBX|{i}|NM|{1000 + i}^X^L||1|u|||||F" for i in range(MAX_ENTRIES + 50)]
    entries = run(RecordKind.HL7V2, content.hl7v2(ID, AUTH, observations=many)).index()
    assert len(entries) <= MAX_ENTRIES


@pytest.mark.parametrize("chunk", [3, 1 << 16])
def test_cda_indexes_document_code_and_date(chunk: int) -> None:
    data = content.cda(ID, AUTH, code="11488-4", effective="20260305")
    entries = run(RecordKind.CDA, data, chunk=chunk).index()
    assert _fields(entries) == {DOCUMENT_CODE: ["11488-4"], DATE: ["20260305"]}
    assert entries[0].system == "2.16.840.1.113883.6.1"
    _no_patient(entries)


def test_fhir_observation_indexes_type_code_value_date() -> None:
    entries = run(RecordKind.FHIR, content.fhir(ID, AUTH, code="8867-4")).index()
    assert _fields(entries) == {RESOURCE_TYPE: ["Observation"], OBSERVATION: ["8867-4"],
                                DATE: ["20260103"]}
    obs = next(e for e in entries if e.field == OBSERVATION)
    assert (obs.system, obs.quantity, obs.unit) == ("http://loinc.org", "13.5", "g/dL")
    _no_patient(entries)


def test_fhir_bundle_indexes_each_entry() -> None:
    subject = {"identifier": {"system": AUTH, "value": ID}}
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "DocumentReference", "status": "current",
                      "subject": subject, "date": "2026-04-01T10:00:00Z",
                      "type": {"coding": [{"system": "http://loinc.org", "code": "34133-9"}]}}},
        {"resource": {"resourceType": "Condition", "subject": subject,
                      "code": {"coding": [{"system": "http://snomed.info/sct",
                                           "code": "38341003"}]}}},
    ]}
    entries = run(RecordKind.FHIR, json.dumps(bundle).encode()).index()
    fields = _fields(entries)
    assert fields[RESOURCE_TYPE] == ["Bundle", "DocumentReference", "Condition"]
    assert fields[DOCUMENT_CODE] == ["34133-9"]
    assert fields[CODE] == ["38341003"]
    assert fields[DATE] == ["20260401"]


@pytest.mark.parametrize("kind", [RecordKind.PDF, RecordKind.OTHER])
def test_pdf_and_other_index_nothing(kind: RecordKind) -> None:
    assert run(kind, content.pdf()).index() == []


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns of the invalid DA
def test_values_that_are_not_codes_are_not_indexed() -> None:
    data = content.dicom(ID, AUTH, Modality="CT", StudyDate="20261340")  # no 13th month
    assert DATE not in _fields(run(RecordKind.DICOM, data).index())
    assert day("2026-02-03T00:00Z") == "20260203"
    assert day("garbage") is None


def test_a_fresh_validator_has_no_entries() -> None:
    assert validator_for(RecordKind.CDA, PATIENT).index() == []


def test_hl7_with_non_ascii_separators_is_stored_without_observations() -> None:
    """A separator outside ASCII (here U+00A6) is valid HL7; the message is stored, only
    its OBR/OBX fields are not indexed."""
    data = content.hl7v2(ID, AUTH).decode().replace("|", "\u00a6").encode()
    fields = _fields(run(RecordKind.HL7V2, data).index())
    assert OBSERVATION not in fields
    assert fields[CONTROL_ID] == ["MSG00001"]


def test_hl7_reads_at_most_max_entries_obx_segments_but_always_looks_for_pid() -> None:
    """Bogus OBX lines use up the OBX budget (so a stream of them costs no more than the
    PID search); a second PID after them is still refused."""
    bogus = ["OBX"] * MAX_ENTRIES
    late = content.PCD01_OBSERVATIONS[:1]
    data = content.hl7v2(ID, AUTH, observations=[*bogus, *late])
    assert OBSERVATION not in _fields(run(RecordKind.HL7V2, data, chunk=4096).index())
    second_pid = content.hl7v2(ID, AUTH, observations=[*bogus, "PID|1||X^^^HOSP"])
    assert "more than one PID" in refused(RecordKind.HL7V2, second_pid, chunk=4096)
