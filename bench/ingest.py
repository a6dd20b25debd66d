"""DICOM ingest and retrieval: PutRecord and C-STORE against a raw S3 PUT, C-GET against
raw S3 GETs, on the same SeaweedFS, in one run.

Run from the project root::

    .venv/bin/python bench/ingest.py                # 120 instances per sender count
    .venv/bin/python bench/ingest.py --instances 40 --senders 1,4   # a smoke run

It brings up a local stack in a temporary MEDVAULT_HOME (``LocalStack.up``), turns the
DICOM listener on (``[dicom]`` in its config, then a restart of the service), makes
synthetic 512 KiB CT instances with pydicom, and for 1, 4 and 16 concurrent senders:

- **PutRecord**: gRPC + mutual TLS, the records clerk's certificate, kind DICOM, one
  instance per call (as an EMR or a gateway would);
- **C-STORE**: pynetdicom associations over TLS with the same certificate (one
  association per sender, the instances spread over them, as modalities do);
- **raw S3 PUT**: the minio SDK straight into another bucket of the same SeaweedFS with
  the service's credentials (``make_minio_client``), the same bytes.

Then a study of ``--instances`` instances is fetched with C-GET (pynetdicom, one
association, as a viewer) and with raw S3 GETs of the same objects' sizes, serially.
Each medvault figure is printed with its ratio to the raw one run just before it. The
exit status is always 0: a benchmark informs, it does not gate.
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import shutil
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydicom import dcmread  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import AE, StoragePresentationContexts, build_role, evt  # noqa: E402
from pynetdicom.sop_class import (  # noqa: E402
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
)

from service._gen.medvault.v1 import access_pb2, access_pb2_grpc  # noqa: E402
from service._gen.medvault.v1 import records_pb2 as pb  # noqa: E402
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc  # noqa: E402
from service.localstack.layout import port_free  # noqa: E402
from service.localstack.service_proc import TlsClient  # noqa: E402
from service.localstack.stack import LocalStack  # noqa: E402
from storage.s3_blobs import make_minio_client  # noqa: E402
from tests import content  # noqa: E402

KIB = 1 << 10
SIZE = 512 * KIB
AE_TITLE = "MEDVAULT"
AUTHORITY_OID = "2.999.77.1"
PATIENT = pb.PatientId(id="BENCH-DICOM-1", assigning_authority=f"urn:oid:{AUTHORITY_OID}")
RAW_BUCKET = "bench-ingest-raw"
MAX_MESSAGE = 4 << 20


def _free_port() -> int:
    for port in range(21000, 30000):
        if port_free(port):
            return port
    raise SystemExit("no free port for the DICOM listener")


def enable_dicom(stack: LocalStack) -> int:
    """Add a [dicom] section to the stack's config and restart the service with it."""
    port = _free_port()
    config = stack.layout.config
    config.write_text(config.read_text() + (
        f'\n[dicom]\nlisten = "127.0.0.1:{port}"\nae_title = "{AE_TITLE}"\n'
    ))  # fmt: skip
    # The service alone restarts with the new section (SeaweedFS keeps running).
    stack._service.stop()
    stack.start_service()
    return port


def make_instances(n: int, study_uid: str) -> list[bytes]:
    """``n`` CT instances of 512 KiB of one study (pixel data synthetic)."""
    pixels = secrets.token_bytes(SIZE)
    return [
        content.dicom(PATIENT.id, PATIENT.assigning_authority, pixels=pixels,
                      StudyInstanceUID=study_uid)
        for _ in range(n)
    ]


def _channel(tls: TlsClient, endpoint: str) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(), private_key=tls.key.read_bytes(),
        certificate_chain=tls.cert.read_bytes(),
    )  # fmt: skip
    options = [("grpc.max_send_message_length", MAX_MESSAGE),
               ("grpc.max_receive_message_length", MAX_MESSAGE)]  # fmt: skip
    return grpc.secure_channel(endpoint, creds, options=options)


def _tls_context(tls: TlsClient) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
    context.check_hostname = False  # the dev server certificate names localhost
    context.load_cert_chain(str(tls.cert), str(tls.key))
    return context


def _spread(items: list[bytes], senders: int) -> list[list[bytes]]:
    return [items[i::senders] for i in range(senders)]


def _timed_parallel(work: list[Callable[[], None]]) -> float:
    """Run the callables at once, one thread each; the wall time until all are done."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(work)) as pool:
        for future in [pool.submit(w) for w in work]:
            future.result()
    return time.perf_counter() - start


def put_records(stub: pb_grpc.RecordServiceStub, batch: list[bytes]) -> None:
    for data in batch:
        header = pb.RecordHeader(patient=PATIENT, kind=pb.RECORD_KIND_DICOM,
                                 content_type="application/dicom", title="bench")  # fmt: skip
        stub.PutRecord(iter([pb.PutRecordRequest(header=header),
                             pb.PutRecordRequest(chunk=data)]), timeout=120)  # fmt: skip


def c_store(port: int, context: ssl.SSLContext, batch: list[bytes]) -> None:
    ae = AE(ae_title="BENCHMOD")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE, tls_args=(context, None),
                         max_pdu=1 << 20)  # fmt: skip
    if not assoc.is_established:
        raise SystemExit("C-STORE association refused")
    try:
        for data in batch:
            status = assoc.send_c_store(dcmread(io.BytesIO(data)))
            if status.Status != 0x0000:
                raise SystemExit(f"C-STORE status {status.Status:#06x}")
    finally:
        assoc.release()


def raw_put(client: object, batch: list[bytes]) -> None:
    for data in batch:
        client.put_object(RAW_BUCKET, secrets.token_hex(16), io.BytesIO(data), len(data))  # type: ignore[attr-defined]


def c_get(port: int, context: ssl.SSLContext, study_uid: str) -> int:
    """Fetch the study with C-GET; the number of instances received."""
    received = 0
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        nonlocal received
        with lock:
            received += 1
        return 0x0000

    ae = AE(ae_title="BENCHVIEW")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for cx in StoragePresentationContexts[:40]:
        ae.add_requested_context(cx.abstract_syntax)
    roles = [build_role(CTImageStorage, scp_role=True)]
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE, tls_args=(context, None),
                         ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)],
                         max_pdu=1 << 20)  # fmt: skip
    if not assoc.is_established:
        raise SystemExit("C-GET association refused")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    try:
        for _status, _identifier in assoc.send_c_get(
            query, StudyRootQueryRetrieveInformationModelGet
        ):
            pass
    finally:
        assoc.release()
    return received


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=120, help="instances per measurement")
    p.add_argument("--senders", default="1,4,16", help="comma-separated sender counts")
    ns = p.parse_args()
    senders_list = [int(x) for x in ns.senders.split(",")]
    home = Path(tempfile.mkdtemp(prefix="medvault-ingest-"))
    stack = LocalStack(home, report=lambda line: print(f"  [stack] {line}", flush=True))
    try:
        stack.up()
        port = enable_dicom(stack)
        clerk, doctor = stack.tls_client("clerk-thu"), stack.tls_client("dr-lan")
        endpoint = stack.endpoint()
        writer = _channel(clerk, endpoint)
        access_pb2_grpc.AccessServiceStub(writer).GrantAccess(
            access_pb2.GrantAccessRequest(patient=PATIENT, principal="dr-lan"), timeout=30
        )
        stub = pb_grpc.RecordServiceStub(writer)
        config = stack._config()
        raw = make_minio_client(
            config.s3.endpoint,
            (home / "secrets" / "s3-access-key").read_text().strip(),
            (home / "secrets" / "s3-secret-key").read_text().strip(),
        )
        if not raw.bucket_exists(RAW_BUCKET):
            raw.make_bucket(RAW_BUCKET)
        clerk_tls = _tls_context(clerk)
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        print(f"\nDICOM ingest, {SIZE // KIB} KiB instances, {ns.instances} per row - {when}, "
              f"{os.cpu_count()} CPUs\n")  # fmt: skip
        print(f"{'senders':>7}  {'raw S3 PUT/s':>12}  {'PutRecord/s':>11}  {'ratio':>5}  "
              f"{'C-STORE/s':>9}  {'ratio':>5}")  # fmt: skip
        for senders in senders_list:
            rates = {}
            for name in ("raw", "put", "store"):
                batch = make_instances(ns.instances, str(generate_uid()))
                parts = _spread(batch, senders)
                if name == "raw":
                    work = [lambda b=b: raw_put(raw, b) for b in parts]
                elif name == "put":
                    work = [lambda b=b: put_records(stub, b) for b in parts]
                else:
                    work = [lambda b=b: c_store(port, clerk_tls, b) for b in parts]
                rates[name] = ns.instances / _timed_parallel(work)
            print(f"{senders:>7}  {rates['raw']:>12.1f}  {rates['put']:>11.1f}  "
                  f"{rates['put'] / rates['raw']:>5.2f}  {rates['store']:>9.1f}  "
                  f"{rates['store'] / rates['raw']:>5.2f}", flush=True)  # fmt: skip
        # Retrieval: one study by C-GET against raw GETs of as many objects.
        study_uid = str(generate_uid())
        c_store(port, clerk_tls, make_instances(ns.instances, study_uid))
        keys = [o.object_name for o in raw.list_objects(RAW_BUCKET)][: ns.instances]
        start = time.perf_counter()
        for key in keys:
            reply = raw.get_object(RAW_BUCKET, key)
            reply.read()
            reply.close()
            reply.release_conn()
        raw_s = time.perf_counter() - start
        start = time.perf_counter()
        got = c_get(port, _tls_context(doctor), study_uid)
        get_s = time.perf_counter() - start
        print(f"\nC-GET of a {got}-instance study: {get_s:.1f} s ({got / get_s:.1f} inst/s); "
              f"raw S3 GETs of {len(keys)} objects: {raw_s:.1f} s "
              f"({len(keys) / raw_s:.1f}/s); ratio {raw_s / get_s:.2f}")  # fmt: skip
        writer.close()
    finally:
        stack.down()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
