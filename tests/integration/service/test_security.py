"""Transport security, health and reflection, and no plaintext at rest.

PYTEST_DONT_REWRITE: a failed assertion shows no values, since they could look like
patient data; the helpers in calls.py name what differs instead.
"""

from __future__ import annotations

import io
import mmap
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from storage.sql_metadata import make_engine, records
from tests.content import pdf
from tests.fixtures.service import RunningService
from tests.integration.service.calls import (
    expect_error,
    expect_same_content,
    get,
    put,
    rpc_error,
    server_bucket,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RECORD_SERVICE = "medvault.v1.RecordService"


def _list_request(patient_id: str = "T0") -> pb.ListRecordsRequest:
    return pb.ListRecordsRequest(patient=pb.PatientId(id=patient_id, assigning_authority="x"))


def _refused(service: RunningService, channel: grpc.Channel) -> None:
    with channel:
        error = rpc_error(pb_grpc.RecordServiceStub(channel).ListRecords, _list_request(),
                          timeout=10)
    expect_error(error, grpc.StatusCode.UNAVAILABLE)
    # The server lives on and serves a client that presents its certificate.
    with service.channel() as channel:
        pb_grpc.RecordServiceStub(channel).ListRecords(_list_request(), timeout=10)


def test_client_without_certificate_is_refused(medvault_service: RunningService) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=medvault_service.tls.ca.read_bytes())
    _refused(medvault_service, grpc.secure_channel(medvault_service.endpoint, creds))


def test_client_of_a_foreign_ca_is_refused(medvault_service: RunningService) -> None:
    tls = medvault_service.tls
    channel = medvault_service.channel(tls.other_ca_client_cert, tls.other_ca_client_key)
    _refused(medvault_service, channel)


def test_plaintext_client_is_refused(medvault_service: RunningService) -> None:
    _refused(medvault_service, grpc.insecure_channel(medvault_service.endpoint))


def test_health_check_serving(medvault_service: RunningService) -> None:
    with medvault_service.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", RECORD_SERVICE):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        error = rpc_error(health.Check, health_pb2.HealthCheckRequest(service="no.such.Service"),
                          timeout=10)
        expect_error(error, grpc.StatusCode.NOT_FOUND)


def test_reflection_lists_the_record_service(medvault_service: RunningService) -> None:
    with medvault_service.channel() as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=RECORD_SERVICE),
        ]
        listed, described = list(reflection.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert RECORD_SERVICE in names, sorted(names)
    assert "grpc.health.v1.Health" in names, sorted(names)
    assert described.file_descriptor_response.file_descriptor_proto, "no descriptor for the service"


def _files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.stat().st_size:
            yield path


def _holding(paths: Iterator[Path], needles: list[bytes]) -> list[str]:
    """Names of the files that contain any of ``needles`` (nothing else is reported)."""
    found = []
    for path in paths:
        if not path.stat().st_size:  # an empty SQLite -wal/-shm file: nothing to find (and
            continue                 # mmap refuses empty files)
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            if any(view.find(needle) != -1 for needle in needles):
                found.append(path.name)
    return found


def _rows(database_url: str) -> list[dict[str, object]]:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            return [dict(r._mapping) for r in connection.execute(sa.select(records)).all()]
    finally:
        engine.dispose()


def test_no_plaintext_at_rest(
    medvault_service: RunningService, stub: pb_grpc.RecordServiceStub, s3_server: object,
    database_url: str,
) -> None:
    tag = uuid.uuid4().hex
    patient = pb.PatientId(id=f"PAT{tag}", assigning_authority=f"urn:oid:2.999.{tag[:6]}")
    title = f"Discharge summary {tag}"
    marker = f"CONTENT-MARKER-{tag}"
    content = pdf(filler=(f"({marker}) ".encode() * 80000)[: 3 << 20])
    record = put(stub, patient, content, title=title, kind=pb.RECORD_KIND_PDF,
                 content_type="application/pdf")
    expect_same_content(get(stub, record.id)[1], content)  # stored for real
    needles = [patient.id.encode(), title.encode(), marker.encode(), tag.encode()]

    seaweed_dir: Path = s3_server.server.data_dir  # type: ignore[attr-defined]
    found = _holding(_files(seaweed_dir), needles)
    assert not found, f"plaintext in the object store's files: {found}"

    url = sa.make_url(database_url)
    if url.get_backend_name() == "sqlite":
        db_file = Path(str(url.database))
        found = _holding(iter(sorted(db_file.parent.glob(db_file.name + "*"))), needles)
        assert not found, f"plaintext in the SQLite files: {found}"
    rows = _rows(database_url)
    assert any(r["id"] == record.id for r in rows), "the record's row is missing"
    for row in rows:
        for column, value in row.items():
            raw = value if isinstance(value, bytes) else str(value).encode()
            assert not any(n in raw for n in needles), f"plaintext in column {column}"

    found = _holding(iter([medvault_service.log_path]), needles)
    assert not found, "plaintext in the service log"

    s3 = s3_server.client()  # type: ignore[attr-defined]
    bucket = server_bucket(medvault_service.config_path)
    buckets = [b.name for b in s3.list_buckets()]
    assert bucket in buckets, "the server's bucket is missing"
    assert not any(tag in name for name in buckets), "a bucket name holds patient data"
    keys = [o.object_name for o in s3.list_objects(bucket, recursive=True)]
    assert keys, "no objects in the server's bucket"
    assert not any(tag in key for key in keys), "an object key holds patient data"
    key = next(r["object_key"] for r in rows if r["id"] == record.id)
    stat = s3.stat_object(bucket, key)
    text = str(dict(stat.metadata or {})) + str(stat.content_type)
    assert not any(n.decode() in text for n in needles), "object metadata holds patient data"


def test_plaintext_scan_would_see_plaintext(s3_server: object) -> None:
    """Control for the scan above: a plaintext object put straight into S3 is found."""
    tag = uuid.uuid4().hex
    needle = f"CONTROL-MARKER-{tag}".encode()
    blob = needle + bytes(range(256)) * 4096 + needle
    s3 = s3_server.client()  # type: ignore[attr-defined]
    bucket = f"control-{tag[:12]}"
    s3.make_bucket(bucket)
    try:
        s3.put_object(bucket, "control", io.BytesIO(blob), len(blob))
        found = _holding(_files(s3_server.server.data_dir), [needle])  # type: ignore[attr-defined]
        assert found, "the scan does not see an object's bytes on disk"
    finally:
        s3.remove_object(bucket, "control")
        s3.remove_bucket(bucket)
