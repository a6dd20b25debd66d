"""The clients of ``bench/load.py``: TLS files, settings, one client's operations and
its loop, and the tally of outcomes. Run ``bench/load.py``, not this."""

from __future__ import annotations

import hashlib
import io
import itertools
import random
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from service._gen.medvault.v1 import audit_pb2, audit_pb2_grpc, signing_pb2, signing_pb2_grpc
from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from tests import content

AUTHORITY = "urn:oid:2.999.77.3"
MAX_MESSAGE = 4 << 20
CALL_TIMEOUT = 60.0
HL7_TYPE = "x-application/hl7-v2+er7"
# Relative weights of the operations (C-STORE only with a DICOM listener).
MIX = {"put": 30, "get": 35, "list": 12, "sign": 10, "audit": 5, "store": 8}


@dataclass(frozen=True)
class Tls:
    """A client's TLS files, read."""

    ca: bytes
    cert: bytes
    key: bytes
    ca_path: Path
    cert_path: Path
    key_path: Path

    @classmethod
    def load(cls, ca: Path, cert: Path, key: Path) -> Tls:
        return cls(ca.read_bytes(), cert.read_bytes(), key.read_bytes(), ca, cert, key)

    @property
    def name(self) -> str:
        """The certificate's CN: the principal."""
        subject = x509.load_pem_x509_certificate(self.cert).subject
        return str(subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)

    def channel(self, endpoint: str) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(self.ca, self.key, self.cert)
        options = [("grpc.max_receive_message_length", MAX_MESSAGE),
                   ("grpc.max_send_message_length", MAX_MESSAGE)]  # fmt: skip
        return grpc.secure_channel(endpoint, creds, options=options)

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_path))
        context.check_hostname = False  # the dev server certificate names localhost
        context.load_cert_chain(str(self.cert_path), str(self.key_path))
        return context


@dataclass(frozen=True)
class Settings:
    """What to run against, how many clients, how long."""

    endpoints: list[str]
    clinician: Tls
    officer: Tls
    clerk: Tls
    clients: int
    seconds: float
    dicom: str = ""  # host:port of the DICOM listener, "" for none
    dicom_ae: str = "MEDVAULT"
    # Clients that C-STORE, one association each: all use the clerk's certificate, and
    # the listener aborts a certificate's associations past its share (max_associations
    # // 4: 4 by default), as it should a runaway modality.
    dicom_senders: int = 4
    seed: int = 1


@dataclass
class Tally:
    """One client's (or the run's) outcomes."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, Counter[str]] = field(default_factory=dict)
    reads: Counter[str] = field(default_factory=Counter)  # successful gets by patient id
    writes: Counter[str] = field(default_factory=Counter)  # successful puts + stores

    def ok(self, op: str, seconds: float) -> None:
        self.latencies.setdefault(op, []).append(seconds)

    def error(self, op: str, code: str) -> None:
        self.errors.setdefault(op, Counter())[code] += 1

    def merge(self, other: Tally) -> None:
        for op, values in other.latencies.items():
            self.latencies.setdefault(op, []).extend(values)
        for op, codes in other.errors.items():
            self.errors.setdefault(op, Counter()).update(codes)
        self.reads.update(other.reads)
        self.writes.update(other.writes)


class LoadError(Exception):
    """A failed operation that is not a gRPC status (a wrong byte, a DICOM status)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


# -- one client ----------------------------------------------------------------------------


class Client:
    """One thread's channels, patient and records."""

    def __init__(self, settings: Settings, index: int, patient: pb.PatientId) -> None:
        endpoint = settings.endpoints[index % len(settings.endpoints)]
        self.settings, self.patient, self.index = settings, patient, index
        self.rng = random.Random(settings.seed * 1000 + index)
        self._channel = settings.clinician.channel(endpoint)
        self._officer_channel = settings.officer.channel(endpoint)
        self.records = pb_grpc.RecordServiceStub(self._channel)
        self.signing = signing_pb2_grpc.SigningServiceStub(self._channel)
        self.audit = audit_pb2_grpc.AuditServiceStub(self._officer_channel)
        self.signer = settings.clinician.name
        self.stored: list[tuple[str, bytes]] = []  # (record id, sha256) of its puts
        self._association: Any = None
        self._count = 0

    def close(self) -> None:
        if self._association is not None and self._association.is_established:
            self._association.release()
        self._channel.close()
        self._officer_channel.close()

    def put(self) -> None:
        self._count += 1
        control = f"L{uuid.uuid4().hex[:18]}"
        obx = [f"OBX|{n}|NM|718-7^Hemoglobin^LN||{self.rng.randint(80, 180) / 10}|g/dL|||||F"
               for n in range(1, 25)]  # fmt: skip
        data = content.hl7v2(self.patient.id, AUTHORITY, control_id=control, observations=obx)
        digest = hashlib.sha256(data).digest()
        header = pb.RecordHeader(patient=self.patient, kind=pb.RECORD_KIND_HL7V2,
                                 content_type=HL7_TYPE, title="load", expected_sha256=digest,
                                 request_id=control)  # fmt: skip
        requests = iter([pb.PutRecordRequest(header=header), pb.PutRecordRequest(chunk=data)])
        record = self.records.PutRecord(requests, timeout=CALL_TIMEOUT)
        self.stored.append((record.id, digest))

    def get(self) -> None:
        record_id, digest = self.rng.choice(self.stored)
        sha = hashlib.sha256()
        for reply in self.records.GetRecord(pb.GetRecordRequest(id=record_id),
                                            timeout=CALL_TIMEOUT):  # fmt: skip
            if reply.WhichOneof("message") == "chunk":
                sha.update(reply.chunk)
        if sha.digest() != digest:
            raise LoadError("CONTENT_MISMATCH")

    def list(self) -> None:
        self.records.ListRecords(pb.ListRecordsRequest(patient=self.patient, page_size=20),
                                 timeout=CALL_TIMEOUT)  # fmt: skip

    def sign(self) -> None:
        record_id, _digest = self.rng.choice(self.stored)
        self.signing.SignRecord(signing_pb2.SignRecordRequest(record_id=record_id,
                                                              signer=self.signer),
                                timeout=CALL_TIMEOUT)  # fmt: skip

    def audit_query(self) -> None:
        request = audit_pb2.QueryEventsRequest(patient=self.patient, limit=20)
        for _event in self.audit.QueryEvents(request, timeout=CALL_TIMEOUT):
            pass

    def store(self) -> None:
        from pydicom import dcmread  # noqa: PLC0415  (only with a DICOM listener)

        assoc = self._dicom_association()
        data = content.dicom(self.patient.id, AUTHORITY, pixels=bytes(2048))
        try:
            status = assoc.send_c_store(dcmread(io.BytesIO(data)))
        except RuntimeError as e:  # pynetdicom: the association ended under it
            self._association = None
            raise LoadError("DICOM_ASSOCIATION_LOST") from e
        if not status:  # no response within the DIMSE timeout, or aborted
            self._association = None
            raise LoadError("DICOM_NO_RESPONSE")
        if status.Status != 0x0000:
            raise LoadError(f"DICOM_STATUS_{status.Status:04X}")

    def _dicom_association(self) -> Any:
        from pynetdicom import AE  # noqa: PLC0415
        from pynetdicom.sop_class import CTImageStorage  # noqa: PLC0415

        if self._association is not None and self._association.is_established:
            return self._association
        host, _, port = self.settings.dicom.rpartition(":")
        ae = AE(ae_title="LOADMOD")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate(host, int(port), ae_title=self.settings.dicom_ae,
                             tls_args=(self.settings.clerk.ssl_context(), None))  # fmt: skip
        if not assoc.is_established:
            raise LoadError("DICOM_ASSOCIATION_REFUSED")
        self._association = assoc
        return assoc


def _code(error: Exception) -> str:
    if isinstance(error, grpc.RpcError):
        return str(error.code().name)  # type: ignore[attr-defined]
    if isinstance(error, LoadError):
        return error.code
    return type(error).__name__


def run_client(client: Client, deadline: float) -> Tally:
    """Loop over the mix: each operation once (put first), even past ``deadline`` (a slow
    host still tries each), then drawn by weight until ``deadline`` (monotonic)."""
    tally = Tally()
    ops: dict[str, Callable[[], None]] = {
        "put": client.put, "get": client.get, "list": client.list, "sign": client.sign,
        "audit": client.audit_query, "store": client.store,
    }  # fmt: skip
    if not client.settings.dicom or client.index >= client.settings.dicom_senders:
        del ops["store"]
    names = list(ops)
    weights = [MIX[n] for n in names]

    def drawn() -> Iterator[str]:
        while time.monotonic() < deadline:
            yield client.rng.choices(names, weights)[0]

    for chosen in itertools.chain(names, drawn()):  # each once, put first; then by weight
        op = chosen if client.stored else "put"
        start = time.perf_counter()
        try:
            ops[op]()
        except Exception as e:  # noqa: BLE001  (every failure is counted by its code)
            tally.error(op, _code(e))
            continue
        tally.ok(op, time.perf_counter() - start)
        if op == "get":
            tally.reads[client.patient.id] += 1
        elif op in ("put", "store"):
            tally.writes[client.patient.id] += 1
    return tally
