"""Attack tests of GetStudy and ListStudies (cold review of the search RPCs), against a
running service on SQLite and PostgreSQL: what a caller without a grant can make the
service spend, and what a caller can learn or cause across patients.

PYTEST_DONT_REWRITE: failures name codes and counts, never identifiers.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from service._gen.medvault.v1 import access_pb2 as apb
from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import records_pb2 as pb
from tests import content
from tests.fixtures.service import RunningService, free_port
from tests.integration.access.helpers import (
    TIMEOUT,
    Client,
    client,
    events,
    new_patient,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

STRANGER = "physician-study-stranger"
# Instances of one study of a patient the stranger has no grant for.
INSTANCES = 24


@dataclass
class World:
    service: RunningService
    metrics_port: int
    clerk: Client
    stranger: Client
    officer: Client

    def token_operations(self) -> float:
        """PKCS#11 operations the service has made so far (its token histogram's count)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        return sum(
            s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "medvault_token_seconds_count"
        )  # fmt: skip

    def put_dicom(self, patient: pb.PatientId, study: str) -> pb.Record:
        data = content.dicom(patient.id, patient.assigning_authority, StudyInstanceUID=study,
                             SeriesInstanceUID=str(generate_uid()))  # fmt: skip
        head = pb.RecordHeader(patient=patient, kind=pb.RECORD_KIND_DICOM,
                               content_type="application/dicom")  # fmt: skip
        stream = iter([pb.PutRecordRequest(header=head), pb.PutRecordRequest(chunk=data)])
        record: pb.Record = self.clerk.records.PutRecord(stream, timeout=TIMEOUT)
        return record


@pytest.fixture(scope="module")
def w(service_factory: Any, fresh_database: str, issue: Any) -> Iterator[World]:
    port = free_port()
    service: RunningService = service_factory(
        fresh_database, metrics_listen=f"127.0.0.1:{port}"
    )
    world = World(
        service, port,
        clerk=client(service, issue("clerk-study-abuse", "records_clerk")),
        stranger=client(service, issue(STRANGER, "physician")),
        officer=client(service, issue("officer-study-abuse", "security_officer")),
    )  # fmt: skip
    yield world
    for c in (world.clerk, world.stranger, world.officer):
        c.close()
    service.stop()


def _drain(c: Client, uid: str) -> tuple[int, grpc.RpcError | None]:
    sent = 0
    try:
        for response in c.records.GetStudy(pb.GetStudyRequest(study_uid=uid), timeout=TIMEOUT):
            sent += response.WhichOneof("message") == "instance"
    except grpc.RpcError as e:
        return sent, e
    return sent, None


def test_get_study_of_a_refused_patient_costs_one_token_operation_not_one_per_instance(
    w: World,
) -> None:
    """A physician with no grant asks for a study of another patient: the service must
    not unwrap every instance's key in the token to refuse them all (a 5000-instance
    study would cost 5000 token operations per call, eight calls at once per principal,
    starving every other caller of the token). One instance proves the refusal."""
    theirs = new_patient()
    study = str(generate_uid())
    for _ in range(INSTANCES):
        w.put_dicom(theirs, study)

    before = w.token_operations()
    sent, error = _drain(w.stranger, study)
    spent = w.token_operations() - before

    assert sent == 0, "an instance of a patient out of scope was sent"
    assert error is not None
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.code().name
    # One unwrap proves the sealed patient; a few more for background probes at most.
    assert spent <= 4, f"{spent:.0f} token operations to refuse {INSTANCES} instances"
    denied = events(w.officer, principal=STRANGER, patient=theirs, action="records.read",
                    outcome=aupb.OUTCOME_DENIED)  # fmt: skip
    assert len(denied) == 1, "the refusal is audited once per patient per call"


def test_an_instance_planted_in_a_study_does_not_put_a_refusal_in_its_readers_name(
    w: World, issue: Any
) -> None:
    reader = "physician-study-reader"
    doctor = client(w.service, issue(reader, "physician"))
    try:
        mine, planted = new_patient(), new_patient()
        w.clerk.access.GrantAccess(apb.GrantAccessRequest(patient=mine, principal=reader),
                                   timeout=TIMEOUT)  # fmt: skip
        study = str(generate_uid())
        w.put_dicom(mine, study)
        w.put_dicom(planted, study)  # a writer's instance claiming the same study
        sent, error = _drain(doctor, study)
        assert error is None, error.code().name if error else ""
        assert sent == 1, "the reader's own patient's instance"
        denied = events(w.officer, principal=reader, outcome=aupb.OUTCOME_DENIED)
        assert not denied, "a refusal was recorded in the name of a reader who asked " \
            "only for their patient's study"
    finally:
        doctor.close()
