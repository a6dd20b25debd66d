"""The DICOM network service (issue 11, item 3) against a running service on SQLite and
PostgreSQL, with dcmtk's storescu, findscu and getscu over TLS with client certificates:
instances stored through C-STORE are findable and retrievable byte-identical, within
the caller's patient scope; refusals get DICOM failure statuses, store nothing and are
audited; a client without a trusted certificate cannot associate.

PYTEST_DONT_REWRITE: failures name fields, statuses and counts, never identifiers.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pynetdicom
import pytest
import sqlalchemy as sa
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import records_pb2 as pb
from service.dicom.listener import HANDSHAKES_PER_ADDRESS
from storage.sql_metadata import record_index
from tests import content
from tests.fixtures.service import RunningService, TlsFiles, free_port
from tests.integration.access.dicom_tools import (
    AE_TITLE,
    Peer,
    dataset_part,
    findscu,
    getscu,
    run,
    storescu,
    tls_tunnel,
)
from tests.integration.access.helpers import (
    TIMEOUT,
    Client,
    audit_inserts_refused,
    client,
    engine_for,
    events,
    grant,
    new_patient,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODALITY = "ct-scanner-dimse"
DOCTOR = "radiologist-dimse"
STRANGER = "physician-dimse-nogrant"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"


@dataclass
class World:
    service: RunningService
    port: int
    engine: sa.Engine
    clerk: Client
    doctor: Client
    officer: Client
    modality: Peer
    reader: Peer
    stranger: Peer
    rogue: Peer
    tmp: Path


@pytest.fixture(scope="module")
def w(service_factory: Any, fresh_database: str, issue: Any, tls_files: TlsFiles,
      tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    port = free_port()
    service: RunningService = service_factory(fresh_database, extra_sections={
        "dicom": {"listen": f"127.0.0.1:{port}", "ae_title": AE_TITLE}})
    ca = tls_files.ca

    def peer(name: str, role: str) -> Peer:
        cert, key = issue(name, role)
        return Peer(cert, key, ca)

    world = World(
        service, port, engine_for(fresh_database),
        client(service, issue("clerk-dimse", "records_clerk")),
        client(service, issue(DOCTOR, "radiologist")),
        client(service, issue("officer-dimse", "security_officer")),
        peer(MODALITY, "records_clerk"), peer(DOCTOR, "radiologist"),
        peer(STRANGER, "physician"),
        Peer(tls_files.other_ca_client_cert, tls_files.other_ca_client_key, ca),
        tmp_path_factory.mktemp("dimse"),
    )  # fmt: skip
    yield world
    for c in (world.clerk, world.doctor, world.officer):
        c.close()
    world.engine.dispose()
    service.stop()


@dataclass
class Study:
    uid: str
    series: dict[str, list[Path]]  # series uid -> instance files

    @property
    def files(self) -> list[Path]:
        return [f for files in self.series.values() for f in files]


def _make_study(w: World, patient: pb.PatientId, shape: list[int], name: str) -> Study:
    """A synthetic study with ``len(shape)`` series of ``shape[i]`` instances."""
    study = Study(str(generate_uid()), {})
    folder = w.tmp / name
    folder.mkdir()
    for s, count in enumerate(shape):
        series = str(generate_uid())
        study.series[series] = []
        for i in range(count):
            data = content.dicom(patient.id, patient.assigning_authority,
                                 StudyInstanceUID=study.uid, SeriesInstanceUID=series,
                                 StudyDate="20261101", pixels=os.urandom(512))
            path = folder / f"s{s}i{i}.dcm"
            path.write_bytes(data)
            study.series[series].append(path)
    return study


def _grpc_study(c: Client, uid: str) -> list[bytes]:
    """The contents GetStudy streams (gRPC), one per instance."""
    contents: list[bytearray] = []
    for response in c.records.GetStudy(pb.GetStudyRequest(study_uid=uid), timeout=TIMEOUT):
        if response.WhichOneof("message") == "instance":
            contents.append(bytearray())
        else:
            contents[-1] += response.chunk
    return [bytes(b) for b in contents]


def _responses(folder: Path) -> list[Dataset]:
    return [dcmread(p) for p in sorted(folder.glob("rsp*.dcm"))]


def _received(folder: Path) -> dict[str, bytes]:
    """Files getscu wrote, by SOP instance UID."""
    found = {}
    for path in folder.iterdir():
        data = path.read_bytes()
        found[str(dcmread(io.BytesIO(data)).SOPInstanceUID)] = data
    return found


def _index_count(w: World, value: str) -> int:
    with w.engine.connect() as c:
        return int(c.scalar(sa.select(sa.func.count()).select_from(record_index)
                            .where(record_index.c.value == value)) or 0)


def _scu() -> AE:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(content.CT_IMAGE, ExplicitVRLittleEndian)
    ae.add_requested_context(STUDY_ROOT_FIND)
    return ae


COMMENTS: list[str] = []  # the ErrorComment of each failed C-STORE, in order


def _store(w: World, peer: Peer, payload: Dataset | Path) -> int:
    """The status of one C-STORE (pynetdicom as the SCU, on TLS with ``peer``'s cert)."""
    ae = _scu()
    assoc = ae.associate("127.0.0.1", w.port, ae_title=AE_TITLE,
                         tls_args=(peer.context(), None))
    assert assoc.is_established, "association refused"
    try:
        reply = assoc.send_c_store(payload)
        if int(reply.Status):
            COMMENTS.append(str(reply.get("ErrorComment", "")))
        return int(reply.Status)
    finally:
        assoc.release()


# --- the hospital path: storescu, findscu, getscu ------------------------------------


# Issue 11's 200 instances in one association on PostgreSQL, the production backend; the
# same flow with 20 on SQLite: each instance takes the same code path, and the 200 cost
# some 40 s of a loaded CI run per backend.
SHAPES = {"postgresql": ([70, 50], [80]), "sqlite": ([7, 5], [8])}


def test_storescu_then_findscu_and_getscu_byte_identical(w: World) -> None:
    """Two studies (200 instances on PostgreSQL), one storescu association."""
    patient = new_patient()
    grant(w.clerk, patient, DOCTOR)
    shape_a, shape_b = SHAPES[w.engine.dialect.name]
    a = _make_study(w, patient, shape_a, "a")
    b = _make_study(w, patient, shape_b, "b")
    total = len(a.files) + len(b.files)
    assert total == sum(shape_a) + sum(shape_b)
    counts = {a.uid: len(a.files), b.uid: len(b.files)}
    sent = storescu(w.modality, w.port, a.files + b.files)
    assert sent.returncode == 0, f"storescu exit {sent.returncode}"

    # Stored as DICOM records of the patient the header names, each write audited.
    studies = w.doctor.records.ListStudies(pb.ListStudiesRequest(patient=patient),
                                           timeout=TIMEOUT).studies
    assert {s.study_uid: s.instance_count for s in studies} == counts
    # What medvault stored is the data set exactly as sent (behind its own file meta).
    originals = {str(dcmread(f).SOPInstanceUID): dataset_part(f.read_bytes())
                 for f in a.files + b.files}
    for study in (a, b):
        stored = _grpc_study(w.doctor, study.uid)
        assert len(stored) == len(study.files), "instances stored"
        for data in stored:
            sop = str(dcmread(io.BytesIO(data)).SOPInstanceUID)
            assert dataset_part(data) == originals[sop], "stored data set differs"
    writes = events(w.officer, principal=MODALITY, action="records.write",
                    outcome=aupb.OUTCOME_ALLOWED)
    assert len(writes) >= total, f"{len(writes)} write events"

    # C-FIND at STUDY level by patient, then SERIES and IMAGE level in study a.
    found = findscu(w.reader, w.port, w.tmp / "find-study", {
        "QueryRetrieveLevel": "STUDY", "PatientID": patient.id,
        "IssuerOfPatientID": patient.assigning_authority.removeprefix("urn:oid:"),
        "StudyInstanceUID": "", "NumberOfStudyRelatedInstances": "", "StudyDate": "",
        "ModalitiesInStudy": ""})  # fmt: skip
    assert found.returncode == 0, f"findscu exit {found.returncode}"
    rows = _responses(w.tmp / "find-study")
    assert {str(r.StudyInstanceUID): int(r.NumberOfStudyRelatedInstances) for r in rows} == (
        counts)
    assert {str(r.ModalitiesInStudy) for r in rows} == {"CT"}
    # By a list of study UIDs, with a date range that matches and one that does not.
    for name, dates, want in (("in-range", "20261001-20261130", {a.uid, b.uid}),
                              ("out-of-range", "20250101-20250201", set())):
        findscu(w.reader, w.port, w.tmp / name, {
            "QueryRetrieveLevel": "STUDY", "StudyInstanceUID": f"{a.uid}\\{b.uid}",
            "StudyDate": dates})  # fmt: skip
        got = {str(r.StudyInstanceUID) for r in _responses(w.tmp / name)}
        assert got == want, f"{name}: {len(got)} studies"
    findscu(w.reader, w.port, w.tmp / "find-series", {
        "QueryRetrieveLevel": "SERIES", "StudyInstanceUID": a.uid, "SeriesInstanceUID": "",
        "NumberOfSeriesRelatedInstances": ""})  # fmt: skip
    series = {str(r.SeriesInstanceUID): int(r.NumberOfSeriesRelatedInstances)
              for r in _responses(w.tmp / "find-series")}
    assert series == {uid: len(files) for uid, files in a.series.items()}
    findscu(w.reader, w.port, w.tmp / "find-image", {
        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": a.uid, "SOPInstanceUID": ""})
    sops = {str(r.SOPInstanceUID) for r in _responses(w.tmp / "find-image")}
    assert sops == {str(dcmread(f).SOPInstanceUID) for f in a.files}

    # C-GET of each study (getscu through a TLS tunnel): byte-identical data sets.
    before = len(events(w.officer, principal=DOCTOR, action="records.read",
                        outcome=aupb.OUTCOME_ALLOWED))
    with tls_tunnel(w.reader, w.port) as tunnel:
        for study in (a, b):
            out = w.tmp / f"get-{study.uid}"
            got = getscu(tunnel, out, {"QueryRetrieveLevel": "STUDY",
                                       "StudyInstanceUID": study.uid})
            assert got.returncode == 0, f"getscu exit {got.returncode}"
            received = _received(out)
            assert len(received) == len(study.files), "instances retrieved"
            for f in study.files:
                original = f.read_bytes()
                copy = received[str(dcmread(f).SOPInstanceUID)]
                assert dataset_part(copy) == dataset_part(original), "data set differs"
                assert dcmread(io.BytesIO(copy)).PixelData == dcmread(f).PixelData
    # A sender that sends the same instances again (a retry) makes no second record.
    assert storescu(w.modality, w.port, a.files[:10]).returncode == 0
    again = w.doctor.records.ListStudies(pb.ListStudiesRequest(patient=patient),
                                         timeout=TIMEOUT).studies
    assert {s.study_uid: s.instance_count for s in again} == counts, "resent"
    reads = events(w.officer, principal=DOCTOR, action="records.read",
                   outcome=aupb.OUTCOME_ALLOWED)
    assert len(reads) - before == total, f"{len(reads) - before} C-GET read events"


def test_a_caller_without_a_grant_finds_and_gets_nothing_and_is_audited(w: World) -> None:
    patient = new_patient()
    grant(w.clerk, patient, DOCTOR)
    study = _make_study(w, patient, [2], "scope")
    assert storescu(w.modality, w.port, study.files).returncode == 0
    issuer = patient.assigning_authority.removeprefix("urn:oid:")
    findscu(w.stranger, w.port, w.tmp / "stranger-study", {
        "QueryRetrieveLevel": "STUDY", "PatientID": patient.id, "IssuerOfPatientID": issuer,
        "StudyInstanceUID": ""})  # fmt: skip
    findscu(w.stranger, w.port, w.tmp / "stranger-uid", {
        "QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study.uid})
    findscu(w.stranger, w.port, w.tmp / "stranger-image", {
        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study.uid, "SOPInstanceUID": ""})
    for name in ("stranger-study", "stranger-uid", "stranger-image"):
        assert not _responses(w.tmp / name), f"{name}: matches outside scope"
    with tls_tunnel(w.stranger, w.port) as tunnel:
        got = getscu(tunnel, w.tmp / "stranger-get", {"QueryRetrieveLevel": "STUDY",
                                                      "StudyInstanceUID": study.uid})
    assert not list((w.tmp / "stranger-get").iterdir()), "instances retrieved outside scope"
    # The C-GET itself is answered Refused: Not Authorised (0x0124): it reached the
    # service and was judged there (dcmtk prints the status it does not name as such).
    refused = "0x124" in got.stderr or "0x0124" in got.stderr
    assert refused, f"getscu exit {got.returncode}, no Not Authorised status: {_dcmtk_errors(got)}"
    everything = events(w.officer, principal=STRANGER)
    denied = [e for e in everything if e.outcome == aupb.OUTCOME_DENIED]
    actions = {e.action for e in denied}
    assert {"records.list", "records.read"} <= actions, "denied actions: " + "; ".join(
        f"{e.action} {aupb.Outcome.Name(e.outcome)} {e.status}" for e in everything
    )
    assert all(e.status == "PERMISSION_DENIED" for e in denied)


def _dcmtk_errors(run: Any) -> list[str]:
    """dcmtk's error and fatal lines (statuses, association errors; no data set values)."""
    lines = str(run.stderr).splitlines()
    return [line for line in lines if line.startswith(("E:", "F:"))][:5]


def test_a_refused_c_get_is_one_final_response_and_getscu_releases(w: World) -> None:
    """A C-GET refused before any sub-operation is answered once: its status, no data
    set after it, no sub-operation counted. pynetdicom sent an empty Failed SOP Instance
    UID List after the refusal, which dcmtk's getscu never reads: it arrived when getscu
    expected the release response ("Association Release Failed: ... DUL P-Data PDU
    arrived"), and getscu aborted (service.dicom.retrieve)."""
    patient = new_patient()
    grant(w.clerk, patient, DOCTOR)
    study = _make_study(w, patient, [1], "released")
    assert storescu(w.modality, w.port, study.files).returncode == 0
    # The stranger: no grant (0124, which dcmtk does not name for a C-GET); the reader:
    # a study that does not exist (C000).
    for name, peer, uid, status, says, who, outcome in (
        ("no-grant", w.stranger, study.uid, 0x0124, "Unknown Status: 0x124", STRANGER,
         aupb.OUTCOME_DENIED),
        ("no-match", w.reader, str(generate_uid()), 0xC000, "Failed: UnableToProcess",
         DOCTOR, aupb.OUTCOME_FAILED),
    ):  # fmt: skip
        audited = len(events(w.officer, principal=who, action="records.read", outcome=outcome))
        with tls_tunnel(peer, w.port) as tunnel:
            got = getscu(tunnel, w.tmp / f"released-{name}",
                         {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": uid})
        # One error line, the status: the release succeeded (dcmtk says when it fails).
        errors = _dcmtk_errors(got)
        assert errors == [f"E: DIMSE status is: {says}"], f"{name}: {errors}"
        assert not list((w.tmp / f"released-{name}").iterdir()), f"{name}: retrieved"
        # The same request from pynetdicom, which shows the response itself.
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = uid
        ae = AE(ae_title="VIEWER")
        ae.add_requested_context(STUDY_ROOT_GET)
        assoc = ae.associate("127.0.0.1", w.port, ae_title=AE_TITLE,
                             tls_args=(peer.context(), None))
        assert assoc.is_established, "association refused"
        try:
            replies = list(assoc.send_c_get(query, STUDY_ROOT_GET))
        finally:
            assoc.release()
        assert assoc.is_released, f"{name}: not released"
        # One response; no data set (pynetdicom gives an empty Dataset for none).
        got_replies = [(int(r.Status), len(i or ())) for r, i in replies]
        assert got_replies == [(status, 0)], f"{name}: (status, elements) {got_replies}"
        final = replies[0][0]
        counts = [int(final.get(k, -1)) for k in (
            "NumberOfCompletedSuboperations", "NumberOfFailedSuboperations",
            "NumberOfWarningSuboperations")]
        assert counts == [0, 0, 0], f"{name}: sub-operation counts {counts}"
        assert final.get("ErrorComment"), f"{name}: no ErrorComment"
        # Each of the two requests audited once.
        now = len(events(w.officer, principal=who, action="records.read", outcome=outcome))
        assert now - audited == 2, f"{name}: {now - audited} events for 2 refused C-GETs"


def _read_events_refused(w: World) -> contextlib.AbstractContextManager[None]:
    """The database refuses DOCTOR's read events of instances (an audit write error);
    the C-GET's own events (its study lookup) still commit."""
    when = (f"NEW.principal = '{DOCTOR}' AND NEW.action = 'records.read' "
            "AND NEW.resource LIKE 'record/%'")  # fmt: skip
    return audit_inserts_refused(str(w.engine.url), w.engine, when)


def test_getscu_receives_nothing_whose_read_event_cannot_commit(w: World) -> None:
    """Fail closed on C-GET: each instance is fetched while its read event commits, and
    none is sent when the event fails; once events commit again, every one is."""
    patient = new_patient()
    grant(w.clerk, patient, DOCTOR)
    study = _make_study(w, patient, [2], "failclosed")
    assert storescu(w.modality, w.port, study.files).returncode == 0
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study.uid}
    with tls_tunnel(w.reader, w.port) as tunnel:
        with _read_events_refused(w):
            refused = getscu(tunnel, w.tmp / "get-refused", keys)
        assert not list((w.tmp / "get-refused").iterdir()), "sent without its read event"
        # Refused with A702 (Unable to perform sub-operations), and released.
        errors = _dcmtk_errors(refused)
        assert errors == ["E: DIMSE status is: Refused: OutOfResourcesSubOperations"], errors
        getscu(tunnel, w.tmp / "get-again", keys)
    assert len(_received(w.tmp / "get-again")) == len(study.files), "not retrieved after"


# --- refusals: DICOM failure statuses, nothing stored, audited -----------------------


def _instance(patient: pb.PatientId, **attrs: Any) -> Dataset:
    return dcmread(io.BytesIO(content.dicom(patient.id, patient.assigning_authority,
                                            **attrs)))  # fmt: skip


def _raw_file(w: World, name: str, meta_sop: str, body: bytes) -> Path:
    """A Part 10 file whose meta names ``meta_sop`` and whose data set bytes are ``body``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = content.CT_IMAGE
    meta.MediaStorageSOPInstanceUID = meta_sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    path = w.tmp / name
    path.write_bytes(out.getvalue() + body)
    return path


def test_refused_instances_get_failure_statuses_store_nothing_and_are_audited(
    w: World,
) -> None:
    patient = new_patient()
    COMMENTS.clear()
    no_issuer = _instance(patient, IssuerOfPatientID=None)
    assert _store(w, w.modality, no_issuer) == 0xA900, "no IssuerOfPatientID"
    assert "IssuerOfPatientID" in COMMENTS[-1], "the ErrorComment names the field"
    # A writer scoped to its patients (a radiologist) storing for another patient.
    other = _instance(patient)
    assert _store(w, w.reader, other) == 0x0124, "outside the writer's scope"
    # Sent from files as they are: data set bytes that are not DICOM, and a data set
    # that is another instance than the one the C-STORE command names.
    wrong = _instance(patient)
    buffer = io.BytesIO()
    wrong.save_as(buffer, enforce_file_format=True)
    mismatched = _raw_file(w, "mismatch.dcm", str(generate_uid()),
                           dataset_part(buffer.getvalue()))
    garbage_sop = str(generate_uid())
    garbage = _raw_file(w, "garbage.dcm", garbage_sop, b"this is not a DICOM data set\0" * 8)
    pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assert _store(w, w.modality, mismatched) == 0xA900, "instance differs from command"
        status = _store(w, w.modality, garbage)
        assert status == 0xC000, f"not DICOM: {status:#06x}"
    finally:
        pynetdicom._config.STORE_SEND_CHUNKED_DATASET = False
    assert len(COMMENTS) == 4, f"{len(COMMENTS)} failure comments"
    assert all(c and patient.id not in c for c in COMMENTS), "an empty or revealing comment"
    for ds in (no_issuer, other, wrong):
        assert _index_count(w, str(ds.SOPInstanceUID)) == 0, "a refused instance was indexed"
    assert _index_count(w, garbage_sop) == 0
    failed = events(w.officer, principal=MODALITY, action="records.write",
                    outcome=aupb.OUTCOME_FAILED)
    assert len(failed) >= 3, f"{len(failed)} failed writes audited"
    assert all(e.status == "INVALID_ARGUMENT" for e in failed)
    denied = events(w.officer, principal=DOCTOR, action="records.write",
                    outcome=aupb.OUTCOME_DENIED)
    assert denied, "the out-of-scope write was not audited"


def test_the_same_instance_uid_with_other_content_is_a_duplicate(w: World) -> None:
    patient = new_patient()
    first = _instance(patient)
    assert _store(w, w.modality, first) == 0x0000
    assert _store(w, w.modality, first) == 0x0000, "a retry of the same instance"
    first.StudyDate = "20260102"
    status = _store(w, w.modality, first)
    assert status == 0x0111, f"other content under the same UID: {status:#06x}"
    assert _index_count(w, str(first.SOPInstanceUID)) == 1, "one record for the instance"


def test_a_client_without_a_trusted_certificate_cannot_associate(w: World) -> None:
    patient = new_patient()
    study = _make_study(w, patient, [1], "rogue")
    sent = storescu(w.rogue, w.port, study.files)
    assert sent.returncode != 0, "storescu with an untrusted certificate succeeded"
    ae = _scu()
    assoc = ae.associate("127.0.0.1", w.port, ae_title=AE_TITLE,
                         tls_args=(w.rogue.context(), None))
    assert not assoc.is_established, "associated with an untrusted certificate"
    # No certificate at all.
    bare = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(w.rogue.ca))
    bare.check_hostname = False
    assoc = ae.associate("127.0.0.1", w.port, ae_title=AE_TITLE, tls_args=(bare, None))
    assert not assoc.is_established, "associated without a certificate"
    assert _index_count(w, study.uid) == 0, "stored without a trusted certificate"


def test_an_instance_over_the_cap_is_refused_while_it_arrives(
    w: World, service_factory: Any, fresh_database: str, issue: Any
) -> None:
    port = free_port()
    small: RunningService = service_factory(fresh_database, extra_sections={"dicom": {
        "listen": f"127.0.0.1:{port}", "ae_title": AE_TITLE,
        "max_instance_size": 64 << 10}})  # fmt: skip
    try:
        capped = World(**{**w.__dict__, "service": small, "port": port})
        patient = new_patient()
        fits = _instance(patient, pixels=os.urandom(32 << 10))
        assert _store(capped, w.modality, fits) == 0x0000, "an instance under the cap"
        over = _instance(patient, pixels=os.urandom(256 << 10))
        assert _store(capped, w.modality, over) == 0xA700, "an instance over the cap"
        assert _index_count(w, str(over.SOPInstanceUID)) == 0, "stored over the cap"
        assert _index_count(w, str(fits.SOPInstanceUID)) == 1
        # Shutdown with an association open: the service still stops by itself.
        assoc = _scu().associate("127.0.0.1", port, ae_title=AE_TITLE,
                                 tls_args=(w.modality.context(), None))
        assert assoc.is_established
        small.stop()
        assert small.process.returncode == 0, f"exit {small.process.returncode}"
        assoc.abort()
    finally:
        small.stop()


def test_echoscu_over_tls(w: World) -> None:
    echo = run(["echoscu", *w.reader.tls(), "-aet", "VIEWER", "-aec", AE_TITLE,
                "127.0.0.1", str(w.port)])
    assert echo.returncode == 0, f"echoscu exit {echo.returncode}"
    wrong_title = run(["echoscu", *w.reader.tls(), "-aet", "VIEWER", "-aec", "NOTMEDVAULT",
                       "127.0.0.1", str(w.port)])
    assert wrong_title.returncode != 0, "an association to another AE title was accepted"


def _verification(w: World, peer: Peer, network_timeout: float = 20) -> Any:
    """An association for Verification (C-ECHO) as ``peer``, established or not."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    ae.acse_timeout = ae.connection_timeout = 20
    ae.network_timeout = network_timeout
    return ae.associate("127.0.0.1", w.port, ae_title=AE_TITLE,
                        tls_args=(peer.context(), None))  # fmt: skip


def _handshake_lines(w: World) -> list[dict[str, Any]]:
    """The service log's ``dicom tls handshake failed`` lines, parsed."""
    return [json.loads(line) for line in w.service.log_path.read_text().splitlines()
            if '"dicom tls handshake failed"' in line]  # fmt: skip


def test_a_silent_connection_does_not_hold_the_listener(w: World) -> None:
    """Anyone who can reach the port (no certificate needed) opens TCP connections and
    sends nothing. The TLS handshake must not run in the one thread that accepts: while
    the silent connections are still open, a modality still associates and echoes."""
    silent = [socket.create_connection(("127.0.0.1", w.port), timeout=30) for _ in range(3)]
    try:
        assoc = _verification(w, w.modality)
        try:
            assert assoc.is_established, "a silent connection blocked the listener"
            status = assoc.send_c_echo()
            assert status.Status == 0x0000, "C-ECHO failed"
        finally:
            assoc.release()
        for s in silent:  # still held open by the peer: the check above was not after
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                assert s.recv(1) != b"", "a silent connection was closed before the check"
    finally:
        for s in silent:
            s.close()


def test_failed_handshakes_are_logged_by_kind_and_count_only(w: World) -> None:
    """A peer that cannot even complete TLS (here: one speaking plain HTTP) used to leave
    no trace in the service's log. Now failures are logged by kind and count, at most a
    line per 10 s (anyone can fail handshakes: they must not fill the log), none lost,
    and nothing the peer sent is written."""
    marker = f"medvault-probe-{os.urandom(6).hex()}"

    before = len(_handshake_lines(w))
    tries = 20
    for _ in range(tries):
        with socket.create_connection(("127.0.0.1", w.port), timeout=30) as plain:
            plain.sendall(f"GET /{marker} HTTP/1.0\r\n\r\n".encode())
            with contextlib.suppress(OSError):
                while plain.recv(4096):  # the service's alert, then its close
                    pass

    def counted() -> int:
        return sum(line["failures"].get("SSLError", 0) for line in _handshake_lines(w)[before:])

    wait_for(lambda: counted() >= tries, 30, f"{tries} failed handshakes logged")
    logged = _handshake_lines(w)
    new = logged[before:]
    # At most a line per 10 s, however long the connections took on this host: the
    # lines (and the one before them) are a window apart; 9 s for the wall clock.
    times = [datetime.fromisoformat(line["time"]) for line in logged[max(before - 1, 0):]]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert all(gap >= 9 for gap in gaps), f"lines less than a window apart: {gaps}"
    assert all(set(line) - {"time", "level", "logger", "msg", "failures"} == set()
               for line in new), "a line says more than kinds and counts"  # fmt: skip
    assert marker not in w.service.log_path.read_text(), "what the peer sent was logged"


def test_one_address_cannot_hold_every_handshake(w: World) -> None:
    """Attack (cold review 13): connections still in their TLS handshake had no limit, and
    each held a thread and a descriptor for the network timeout: one peer without a
    certificate could open a thousand and run the service out of both. Now one address
    has at most 8 handshakes in progress; the ninth connection is closed at once (and
    counted in the log), and once the peer lets go, a modality associates again."""
    before = len(_handshake_lines(w))
    silent = [socket.create_connection(("127.0.0.1", w.port), timeout=30)
              for _ in range(HANDSHAKES_PER_ADDRESS)]  # fmt: skip
    try:
        # The accepting thread counts each connection before it accepts the next: the
        # ninth is looked at with the eight counted (they stay silent, so held).
        with socket.create_connection(("127.0.0.1", w.port), timeout=30) as extra:
            extra.settimeout(20)
            assert extra.recv(1) == b"", "a ninth handshake from one address was let in"
        wait_for(lambda: any(line["failures"].get("TooManyHandshakes")
                             for line in _handshake_lines(w)[before:]), 30,
                 "the refused handshake in the log")  # fmt: skip
    finally:
        for s in silent:
            s.close()

    def associates() -> bool:
        assoc = _verification(w, w.modality)
        if not assoc.is_established:
            return False
        assoc.release()
        return True

    wait_for(associates, 60, "an association once the silent connections closed")


def test_one_certificate_cannot_hold_every_association(w: World) -> None:
    """Attack (cold review): any certificate of the client CA opened all 16 associations
    and kept them alive with C-ECHOs, and no modality could connect. One certificate now
    holds at most a quarter of them; another certificate still associates."""

    def associate(peer: Peer) -> Any:
        return _verification(w, peer, network_timeout=120)  # the client never gives up

    share = 16 // 4  # the default max_associations, a quarter per certificate
    held = [associate(w.stranger) for _ in range(share)]
    try:
        assert all(a.is_established for a in held), "the share itself was refused"
        extra = associate(w.stranger)
        # Aborted by the service as it opens (the client would wait 120 s on its own).
        deadline = time.monotonic() + 30
        while extra.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not extra.is_established, "a certificate held more than its share"
        # The listener aborts the association, then audits its refusal (the abort does not
        # wait for the trail): on a loaded machine the event may follow the abort seen here.
        refusals: list[aupb.AuditEvent] = []

        def audited() -> bool:
            found = events(w.officer, outcome=aupb.OUTCOME_DENIED)
            refusals[:] = [e for e in found if e.resource == "dicom/association"]
            return bool(refusals)

        wait_for(audited, 20, "the refused association's event")
        assert refusals[-1].status == "RESOURCE_EXHAUSTED"
        other = associate(w.modality)
        try:
            assert other.is_established, "another certificate was locked out"
            assert other.send_c_echo().Status == 0x0000
        finally:
            other.release()
    finally:
        for a in held:
            a.release()
    again = associate(w.stranger)  # released associations give the share back
    try:
        assert again.is_established, "a released association was not counted down"
    finally:
        again.release()
