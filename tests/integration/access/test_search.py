"""Indexing on write and search (issue 11, items 1 and 2) against a running service, on
SQLite and PostgreSQL: index rows per kind, ListRecords filters, ListStudies and
GetStudy, their patient scope and audit, and a database writer editing the index.

PYTEST_DONT_REWRITE: failures name fields, codes and counts, never identifiers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from pydicom.uid import generate_uid

from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import records_pb2 as pb
from storage.sql_metadata import record_index, records
from tests import content
from tests.fixtures.service import RunningService
from tests.integration.access.helpers import (
    TIMEOUT,
    Client,
    client,
    code_of,
    engine_for,
    events,
    grant,
    new_patient,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DOCTOR = "physician-search"
KINDS = {
    "DICOM": (pb.RECORD_KIND_DICOM, "application/dicom"),
    "HL7V2": (pb.RECORD_KIND_HL7V2, "x-application/hl7-v2+er7"),
    "CDA": (pb.RECORD_KIND_CDA, "application/xml"),
    "FHIR": (pb.RECORD_KIND_FHIR, "application/fhir+json"),
    "PDF": (pb.RECORD_KIND_PDF, "application/pdf"),
}


@dataclass
class World:
    service: RunningService
    engine: sa.Engine
    clerk: Client
    doctor: Client
    officer: Client

    def put(self, patient: pb.PatientId, kind: str, data: bytes) -> pb.Record:
        code, content_type = KINDS[kind]
        head = pb.RecordHeader(patient=patient, kind=code, content_type=content_type)
        stream = iter([pb.PutRecordRequest(header=head), pb.PutRecordRequest(chunk=data)])
        record: pb.Record = self.clerk.records.PutRecord(stream, timeout=TIMEOUT)
        return record

    def dicom(self, patient: pb.PatientId, study: str, series: str, **attrs: Any) -> pb.Record:
        data = content.dicom(patient.id, patient.assigning_authority, StudyInstanceUID=study,
                             SeriesInstanceUID=series, **attrs)
        return self.put(patient, "DICOM", data)

    def index_rows(self, record_id: str) -> list[Any]:
        with self.engine.connect() as c:
            return list(c.execute(
                sa.select(record_index).where(record_index.c.record_id == record_id)
            ).all())  # fmt: skip

    def ids(self, patient: pb.PatientId, who: Client | None = None, **filters: Any) -> set[str]:
        reply = (who or self.doctor).records.ListRecords(
            pb.ListRecordsRequest(patient=patient, **filters), timeout=TIMEOUT
        )
        return {r.id for r in reply.records}


@pytest.fixture(scope="module")
def world(service_factory: Any, fresh_database: str, issue: Any) -> Iterator[World]:
    service: RunningService = service_factory(fresh_database)
    clerk = client(service, issue("clerk-search", "records_clerk"))
    doctor = client(service, issue(DOCTOR, "physician"))
    officer = client(service, issue("officer-search", "security_officer"))
    engine = engine_for(fresh_database)
    yield World(service, engine, clerk, doctor, officer)
    for c in (clerk, doctor, officer):
        c.close()
    engine.dispose()
    service.stop()


def _granted(w: World) -> pb.PatientId:
    patient = new_patient()
    grant(w.clerk, patient, DOCTOR)
    return patient


def _fields(rows: list[Any]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for r in rows:
        found.setdefault(r.field, set()).add(r.value)
    return found


def _get_study(c: Client, uid: str) -> tuple[list[pb.StudyInstance], dict[str, bytes], Any]:
    """The instances and their contents (by record id) a GetStudy streamed, and its error."""
    instances: list[pb.StudyInstance] = []
    contents: dict[str, bytearray] = {}
    error = None
    try:
        for response in c.records.GetStudy(pb.GetStudyRequest(study_uid=uid), timeout=TIMEOUT):
            if response.WhichOneof("message") == "instance":
                instances.append(response.instance)
                contents[response.instance.record.id] = bytearray()
            else:
                assert instances, "a chunk came before any instance"
                contents[instances[-1].record.id] += response.chunk
    except grpc.RpcError as e:
        error = e
    return instances, {k: bytes(v) for k, v in contents.items()}, error


# --- indexing on write -------------------------------------------------------------


def test_each_kind_is_indexed_with_the_record_under_its_blind_patient_index(w: World) -> None:
    patient = _granted(w)
    pid, auth = patient.id, patient.assigning_authority
    study, series = generate_uid(), generate_uid()
    stored = {
        "DICOM": w.put(patient, "DICOM", content.dicom(
            pid, auth, StudyInstanceUID=study, SeriesInstanceUID=series, Modality="MR",
            StudyDate="20260210")),
        "HL7V2": w.put(patient, "HL7V2", content.hl7v2(
            pid, auth, control_id="CTRL-IDX", observations=content.PCD01_OBSERVATIONS)),
        "CDA": w.put(patient, "CDA", content.cda(pid, auth, code="11488-4")),
        "FHIR": w.put(patient, "FHIR", content.fhir(pid, auth, code="8867-4")),
        "PDF": w.put(patient, "PDF", content.pdf()),
    }
    expected = {
        "DICOM": {"study_uid": {str(study)}, "series_uid": {str(series)},
                  "modality": {"MR"}, "date": {"20260210"}, "sop_class": {content.CT_IMAGE}},
        "HL7V2": {"message_type": {"ORU^R01"}, "control_id": {"CTRL-IDX"},
                  "observation": {"150456", "MDC_PULS_OXIM_SAT_O2", "149530",
                                  "MDC_PULS_OXIM_PULS_RATE"}, "date": {"20260101"}},
        "CDA": {"document_code": {"11488-4"}, "date": {"20260101"}},
        "FHIR": {"resource_type": {"Observation"}, "observation": {"8867-4"},
                 "date": {"20260103"}},
        "PDF": {},
    }
    with w.engine.connect() as c:
        row_index = {r.id: bytes(r.patient_index) for r in c.execute(
            sa.select(records.c.id, records.c.patient_index).where(
                records.c.id.in_([s.id for s in stored.values()])))}
    for kind, record in stored.items():
        rows = w.index_rows(record.id)
        fields = _fields(rows)
        for field, values in expected[kind].items():
            assert fields.get(field) == values, f"{kind}: {field} indexed wrongly"
        if kind == "DICOM":
            assert "sop_uid" in fields, "DICOM: no SOP instance UID"
        elif kind == "PDF":
            assert not rows, "PDF: indexed"
        for r in rows:
            assert bytes(r.patient_index) == row_index[record.id], f"{kind}: patient index"
            assert r.version == record.version, f"{kind}: version"
            for value in (r.value, r.system, r.quantity, r.unit, r.observed_at):
                assert value is None or pid not in value, f"{kind}: patient id in clear"
    spo2 = next(r for r in w.index_rows(stored["HL7V2"].id) if r.value == "150456")
    assert (spo2.system, spo2.quantity, spo2.unit, spo2.observed_at) == (
        "MDC", "97", "262688", "20260102103000"), "11073 observation details"


FREE_TEXT = "Reviewed with SYNTHETIC-FREETEXT at home"  # what a note could say


def test_free_text_in_observation_fields_is_not_stored_in_clear(w: World) -> None:
    """Attack (cold review): the index stores observation values and times in clear on
    the ground that they are numbers, codes and dates. An HL7 OBX of type ST (or with no
    type), an OBX-14 or a FHIR valueQuantity/effectiveDateTime holding text is free text
    that can name a patient or a diagnosis: it must not reach the database in clear."""
    patient = _granted(w)
    pid, auth = patient.id, patient.assigning_authority
    hl7 = w.put(patient, "HL7V2", content.hl7v2(pid, auth, observations=[
        f"OBX|1|ST|11526-1^Pathology study^LN||{FREE_TEXT}||||||F",
        f"OBX|2||11529-5^Surgical pathology^LN||{FREE_TEXT}||||||F",
        f"OBX|3|NM|718-7^Hemoglobin^LN||13.5|g/dL|||||F|||{FREE_TEXT}",
        "OBX|4|NM|718-7^Hemoglobin^LN||13.7|g/dL|||||F|||20260102103000",
    ]))  # fmt: skip
    observation = json.loads(content.fhir(pid, auth, code="8867-4"))
    observation["valueQuantity"] = {"value": FREE_TEXT, "unit": "g/dL"}
    observation["effectiveDateTime"] = FREE_TEXT
    fhir = w.put(patient, "FHIR", json.dumps(observation).encode())

    for record in (hl7, fhir):
        for row in w.index_rows(record.id):
            for column in ("value", "system", "quantity", "unit", "observed_at"):
                text = getattr(row, column) or ""
                assert "SYNTHETIC-FREETEXT" not in text, f"free text in clear in {column}"
    kept = [r for r in w.index_rows(hl7.id) if r.quantity == "13.7"]
    assert [(r.unit, r.observed_at) for r in kept] == [("g/dL", "20260102103000")], (
        "a numeric observation keeps its value, unit and time")


def test_a_refused_put_leaves_no_index_row(w: World) -> None:
    patient, other = _granted(w), new_patient()
    uid = generate_uid()
    data = content.dicom(other.id, other.assigning_authority, StudyInstanceUID=uid)
    code, content_type = KINDS["DICOM"]
    head = pb.RecordHeader(patient=patient, kind=code, content_type=content_type)
    got = code_of(w.clerk.records.PutRecord,
                  iter([pb.PutRecordRequest(header=head), pb.PutRecordRequest(chunk=data)]),
                  timeout=TIMEOUT)
    assert got == grpc.StatusCode.INVALID_ARGUMENT, got.name
    with w.engine.connect() as c:
        n = c.scalar(sa.select(sa.func.count()).select_from(record_index)
                     .where(record_index.c.value == str(uid)))
    assert n == 0, "index rows of a refused put"


# --- ListRecords filters -----------------------------------------------------------


def test_list_records_filters(w: World) -> None:
    patient = _granted(w)
    pid, auth = patient.id, patient.assigning_authority
    s1, s2, series_a, series_b = (str(generate_uid()) for _ in range(4))
    ct = w.dicom(patient, s1, series_a, Modality="CT", StudyDate="20260105")
    mr = w.dicom(patient, s2, series_b, Modality="MR", StudyDate="20260320")
    discharge = w.put(patient, "CDA", content.cda(pid, auth, effective="20260210"))
    progress = w.put(patient, "CDA", content.cda(pid, auth, code="11506-3",
                                                 effective="20260401"))
    spo2 = w.put(patient, "HL7V2", content.hl7v2(pid, auth,
                                                 observations=content.PCD01_OBSERVATIONS))
    hb = w.put(patient, "FHIR", content.fhir(pid, auth))
    pdf = w.put(patient, "PDF", content.pdf())

    everything = {r.id for r in (ct, mr, discharge, progress, spo2, hb, pdf)}
    assert w.ids(patient) == everything
    assert w.ids(patient, document_code="18842-5") == {discharge.id}
    assert w.ids(patient, document_code="11506-3") == {progress.id}
    assert w.ids(patient, study_uid=s1) == {ct.id}
    assert w.ids(patient, series_uid=series_b) == {mr.id}
    assert w.ids(patient, modality="MR") == {mr.id}
    assert w.ids(patient, observation_code="150456") == {spo2.id}
    assert w.ids(patient, observation_code="MDC_PULS_OXIM_PULS_RATE") == {spo2.id}
    assert w.ids(patient, observation_code="718-7") == {hb.id}
    # Dates: DICOM StudyDate, CDA effectiveTime, HL7 MSH-7 (20260101), FHIR 20260103.
    assert w.ids(patient, date_from="2026-02-01", date_to="2026-03-31") == {
        discharge.id, mr.id}
    assert w.ids(patient, date_from="2026-03-20") == {mr.id, progress.id}
    assert w.ids(patient, date_to="20260103") == {spo2.id, hb.id}
    # Filters combine (AND); a filter on another kind's field matches nothing.
    assert w.ids(patient, modality="CT", date_from="2026-01-05", date_to="2026-01-05") == {
        ct.id}
    assert w.ids(patient, modality="CT", study_uid=s2) == set()
    assert w.ids(patient, document_code="18842-5", kind=pb.RECORD_KIND_FHIR) == set()
    # Another patient's study UID finds nothing under this patient.
    other = _granted(w)
    w.dicom(other, s1, series_a)
    assert w.ids(other, study_uid=s1) != {ct.id}
    assert ct.id not in w.ids(other, study_uid=s1)


def test_filtered_listing_pages_and_is_audited(w: World) -> None:
    patient = _granted(w)
    study = str(generate_uid())
    made = {w.dicom(patient, study, str(generate_uid())).id for _ in range(3)}
    w.put(patient, "PDF", content.pdf())
    seen: set[str] = set()
    token = ""
    while True:
        reply = w.doctor.records.ListRecords(pb.ListRecordsRequest(
            patient=patient, study_uid=study, page_size=2, page_token=token), timeout=TIMEOUT)
        seen |= {r.id for r in reply.records}
        token = reply.next_page_token
        if not token:
            break
    assert seen == made, "paged filtered listing"
    listed = events(w.officer, principal=DOCTOR, patient=patient, action="records.list",
                    outcome=aupb.OUTCOME_ALLOWED)
    assert len(listed) == 2, f"{len(listed)} records.list events for 2 pages"


@pytest.mark.parametrize(("field", "value"), [
    ("study_uid", "1.2.abc"), ("series_uid", "1." + "2" * 70), ("date_from", "2026-13-01"),
    ("date_to", "yesterday"), ("document_code", "x" * 200), ("modality", "C\nT"),
    ("observation_code", " "),
])  # fmt: skip
def test_bad_filters_are_invalid_argument_naming_the_field(
    w: World, field: str, value: str
) -> None:
    patient = _granted(w)
    with pytest.raises(grpc.RpcError) as caught:
        w.ids(patient, **{field: value})
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.code().name
    assert field in (caught.value.details() or ""), "the error does not name the field"
    assert value.strip() == "" or value not in (caught.value.details() or ""), "value echoed"


def test_date_range_inverted_is_invalid(w: World) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        w.ids(_granted(w), date_from="2026-05-01", date_to="2026-04-01")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- ListStudies and GetStudy ------------------------------------------------------


def test_list_studies_summarises_the_patients_studies(w: World) -> None:
    patient = _granted(w)
    old, new = str(generate_uid()), str(generate_uid())
    ser1, ser2, ser3 = (str(generate_uid()) for _ in range(3))
    w.dicom(patient, old, ser1, Modality="CT", StudyDate="20250101")
    w.dicom(patient, new, ser3, Modality="CT", StudyDate="20260601")
    w.dicom(patient, new, ser2, Modality="PT", StudyDate="20260601")
    w.dicom(patient, new, ser2, Modality="PT", StudyDate="20260601")
    w.put(patient, "PDF", content.pdf())
    reply = w.doctor.records.ListStudies(pb.ListStudiesRequest(patient=patient),
                                         timeout=TIMEOUT)
    got = [(s.study_uid, s.study_date, list(s.modalities), s.series_count, s.instance_count)
           for s in reply.studies]
    assert got == [(new, "2026-06-01", ["CT", "PT"], 2, 3),
                   (old, "2025-01-01", ["CT"], 1, 1)], "study summaries"
    listed = events(w.officer, principal=DOCTOR, patient=patient, action="records.list",
                    outcome=aupb.OUTCOME_ALLOWED)
    assert len(listed) == 1, "ListStudies is audited as one listing"


def test_get_study_streams_every_instance_and_audits_each_read(w: World) -> None:
    patient = _granted(w)
    study, series = str(generate_uid()), str(generate_uid())
    pid, auth = patient.id, patient.assigning_authority
    datas = [content.dicom(pid, auth, StudyInstanceUID=study, SeriesInstanceUID=series,
                           pixels=bytes([n]) * (300 << 10)) for n in range(3)]
    stored = [w.put(patient, "DICOM", d) for d in datas]
    w.dicom(patient, str(generate_uid()), series)  # another study: not streamed
    instances, contents, error = _get_study(w.doctor, study)
    assert error is None, error.code().name if error else ""
    assert [i.record.id for i in instances] == [r.id for r in stored], "instances"
    assert all(i.series_uid == series and i.sop_instance_uid for i in instances)
    for record, data in zip(stored, datas, strict=True):
        assert contents[record.id] == data, "instance content differs"
    reads = events(w.officer, principal=DOCTOR, patient=patient, action="records.read",
                   outcome=aupb.OUTCOME_ALLOWED)
    assert sorted(e.resource for e in reads) == sorted(
        f"record/{r.id}/v1" for r in stored), "one read event per instance"


def test_studies_are_scoped_to_the_granted_patient(w: World) -> None:
    mine, theirs = _granted(w), new_patient()
    w.dicom(mine, str(generate_uid()), str(generate_uid()))
    their_study = str(generate_uid())
    w.dicom(theirs, their_study, str(generate_uid()))
    w.dicom(theirs, their_study, str(generate_uid()))

    got = code_of(w.doctor.records.ListStudies, pb.ListStudiesRequest(patient=theirs),
                  timeout=TIMEOUT)
    assert got == grpc.StatusCode.PERMISSION_DENIED, got.name
    instances, contents, error = _get_study(w.doctor, their_study)
    assert error is not None
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not instances, "another patient's instance was sent"
    assert not contents, "another patient's content was sent"
    got = code_of(w.doctor.records.ListRecords,
                  pb.ListRecordsRequest(patient=theirs, study_uid=their_study), timeout=TIMEOUT)
    assert got == grpc.StatusCode.PERMISSION_DENIED, got.name

    denied = events(w.officer, principal=DOCTOR, patient=theirs, outcome=aupb.OUTCOME_DENIED)
    assert sorted(e.action for e in denied) == ["records.list", "records.list",
                                                "records.read"], (
        "each refusal audited once (GetStudy: once for the patient)")
    allowed = events(w.officer, principal=DOCTOR, patient=theirs, outcome=aupb.OUTCOME_ALLOWED)
    assert not allowed, "an allowed event about the other patient"


def test_unknown_study_is_not_found_and_audited(w: World) -> None:
    uid = str(generate_uid())
    _, _, error = _get_study(w.doctor, uid)
    assert error is not None
    assert error.code() == grpc.StatusCode.NOT_FOUND
    failed = [e for e in events(w.officer, principal=DOCTOR, action="records.read",
                                outcome=aupb.OUTCOME_FAILED) if e.resource == f"study/{uid}"]
    assert len(failed) == 1, "the failed search is audited"
    _, _, error = _get_study(w.doctor, "not-a-uid")
    assert error is not None
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "study_uid" in (error.details() or "")


def test_an_amended_instance_is_found_under_its_latest_version_only(w: World) -> None:
    patient = _granted(w)
    first_study, second_study = str(generate_uid()), str(generate_uid())
    first = w.dicom(patient, first_study, str(generate_uid()), Modality="CT")
    data = content.dicom(patient.id, patient.assigning_authority,
                         StudyInstanceUID=second_study, Modality="MR")
    code, content_type = KINDS["DICOM"]
    head = pb.RecordHeader(patient=patient, kind=code, content_type=content_type,
                           supersedes=first.id)
    second = w.clerk.records.PutRecord(
        iter([pb.PutRecordRequest(header=head), pb.PutRecordRequest(chunk=data)]),
        timeout=TIMEOUT)
    assert second.version == 2
    assert w.ids(patient, study_uid=first_study) == set()
    assert w.ids(patient, study_uid=second_study) == {first.id}
    versions = w.doctor.records.ListRecords(pb.ListRecordsRequest(
        patient=patient, modality="CT", all_versions=True), timeout=TIMEOUT)
    assert [(r.id, r.version) for r in versions.records] == [(first.id, 1)]
    _, _, error = _get_study(w.doctor, first_study)
    assert error is not None
    assert error.code() == grpc.StatusCode.NOT_FOUND
    instances, _, _ = _get_study(w.doctor, second_study)
    assert [(i.record.id, i.record.version) for i in instances] == [(first.id, 2)]


# --- a database writer edits the index ---------------------------------------------


def test_index_rows_a_database_writer_adds_never_release_another_patients_record(
    w: World,
) -> None:
    mine, theirs = _granted(w), new_patient()
    study, series = str(generate_uid()), str(generate_uid())
    own = w.dicom(mine, study, series)
    their = w.dicom(theirs, str(generate_uid()), str(generate_uid()))
    with w.engine.connect() as c:
        my_index = bytes(c.scalar(sa.select(records.c.patient_index)
                                  .where(records.c.id == own.id)))
    # The writer files their instance under my study and my patient, in every column.
    with w.engine.begin() as c:
        c.execute(record_index.insert(), [
            {"record_id": their.id, "version": their.version, "patient_index": my_index,
             "field": field, "value": value}
            for field, value in (("study_uid", study), ("series_uid", series),
                                 ("modality", "CT"), ("document_code", "18842-5"))
        ])  # fmt: skip

    instances, contents, error = _get_study(w.doctor, study)
    assert error is None, error.code().name if error else ""
    assert [i.record.id for i in instances] == [own.id], "the other patient's instance sent"
    assert their.id not in contents, "the other patient's content sent"
    # The candidate's verified row names another patient: it is left out quietly (a
    # study the reader may read in part puts no refusal in their name for the rest).
    refused = events(w.officer, principal=DOCTOR, patient=theirs, outcome=aupb.OUTCOME_DENIED)
    assert refused == [], "a refusal was recorded in the reader's name for a planted row"
    reads = events(w.officer, principal=DOCTOR, patient=theirs, action="records.read")
    assert reads == [], "the other patient's record was read"

    assert w.ids(mine, study_uid=study) == {own.id}
    assert w.ids(mine, document_code="18842-5") == set()
    reply = w.doctor.records.ListStudies(pb.ListStudiesRequest(patient=mine), timeout=TIMEOUT)
    assert [(s.study_uid, s.instance_count) for s in reply.studies] == [(study, 1)]


def test_a_non_dicom_record_filed_in_a_study_by_a_database_writer_is_not_an_instance(
    w: World,
) -> None:
    """Attack (cold review): the index proposes candidates, and a writer can file any
    record of the patient under a study UID. GetStudy then streamed a PDF (or an HL7
    message) as a DICOM instance, which the CLI saves as <sop>.dcm for a viewer, and
    ListStudies listed a study that has no image. A record's kind is part of its
    verified row: only DICOM records are instances."""
    patient = _granted(w)
    study = str(generate_uid())
    note = w.put(patient, "PDF", content.pdf())
    with w.engine.connect() as c:
        index = bytes(c.scalar(sa.select(records.c.patient_index)
                               .where(records.c.id == note.id)))
    with w.engine.begin() as c:
        c.execute(record_index.insert(), [
            {"record_id": note.id, "version": note.version, "patient_index": index,
             "field": field, "value": value}
            for field, value in (("study_uid", study), ("series_uid", "1.2.3"),
                                 ("sop_uid", "1.2.3.4"), ("modality", "CT"))
        ])  # fmt: skip
    instances, contents, error = _get_study(w.doctor, study)
    assert not instances, "a PDF was streamed as a DICOM instance"
    assert not contents
    assert error is not None
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.code().name
    reply = w.doctor.records.ListStudies(pb.ListStudiesRequest(patient=patient),
                                         timeout=TIMEOUT)  # fmt: skip
    assert study not in [s.study_uid for s in reply.studies], "a study without an image"


def test_a_record_row_moved_under_the_granted_patient_fails_the_search(w: World) -> None:
    mine, theirs = _granted(w), new_patient()
    study = str(generate_uid())
    own = w.dicom(mine, study, str(generate_uid()))
    their = w.dicom(theirs, study, str(generate_uid()))
    with w.engine.connect() as c:
        my_index = c.scalar(sa.select(records.c.patient_index).where(records.c.id == own.id))
    # Now also the record row itself, and its index rows, claim my patient.
    with w.engine.begin() as c:
        c.execute(records.update().where(records.c.id == their.id)
                  .values(patient_index=my_index))
        c.execute(record_index.update().where(record_index.c.record_id == their.id)
                  .values(patient_index=my_index))
    for name, request, method in (
        ("ListRecords", pb.ListRecordsRequest(patient=mine, study_uid=study),
         w.doctor.records.ListRecords),
        ("ListStudies", pb.ListStudiesRequest(patient=mine), w.doctor.records.ListStudies),
    ):
        got = code_of(method, request, timeout=TIMEOUT)
        assert got == grpc.StatusCode.DATA_LOSS, f"{name}: {got.name}"
    _instances, contents, error = _get_study(w.doctor, study)
    assert error is not None
    assert error.code() == grpc.StatusCode.DATA_LOSS
    assert their.id not in contents, "the moved record's content sent"


def test_an_index_row_deleted_only_hides_the_record(w: World) -> None:
    patient = _granted(w)
    study = str(generate_uid())
    record = w.dicom(patient, study, str(generate_uid()))
    with w.engine.begin() as c:
        c.execute(record_index.delete().where(record_index.c.record_id == record.id))
    assert w.ids(patient, study_uid=study) == set()
    assert record.id in w.ids(patient), "unfiltered listing still finds it"


@pytest.fixture
def w(world: World) -> World:
    return world
