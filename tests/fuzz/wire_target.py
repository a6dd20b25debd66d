"""Fuzz target: a gRPC request body off the wire (``service.wire.decode``), as the
request type the first byte picks. Documented never to raise: a message, or a
``Rejected`` naming the field."""

from __future__ import annotations

from service import wire
from service._gen.medvault.v1 import (
    access_pb2,
    audit_pb2,
    backup_pb2,
    keys_pb2,
    records_pb2,
    signing_pb2,
    stats_pb2,
)
from tests.fuzz.formats_targets import PATIENT

_MODULES = (access_pb2, audit_pb2, backup_pb2, keys_pb2, records_pb2, signing_pb2, stats_pb2)
REQUESTS = sorted(
    (getattr(module, name) for module in _MODULES for name in dir(module)
     if name.endswith("Request")),
    key=lambda cls: cls.DESCRIPTOR.full_name,
)  # fmt: skip


def target(data: bytes) -> None:
    """Decode ``data[1:]`` as request type ``data[0]``."""
    if not data:
        return
    cls = REQUESTS[data[0] % len(REQUESTS)]
    result = wire.decode(cls, data[1:])
    if not isinstance(result, cls | wire.Rejected):
        raise TypeError(f"decode returned a {type(result).__name__}")


def seeds() -> list[bytes]:
    """A PutRecord header message."""
    header = records_pb2.PutRecordRequest(header=records_pb2.RecordHeader(
        patient=records_pb2.PatientId(id=PATIENT.id, assigning_authority=PATIENT.authority),
        kind=records_pb2.RECORD_KIND_HL7V2, content_type="x-application/hl7-v2+er7", title="t",
    ))  # fmt: skip
    return [bytes([REQUESTS.index(records_pb2.PutRecordRequest)]) + header.SerializeToString()]
