"""Mixed load on a running medvault: N clients for T seconds, then the audit trail is
checked against what they did.

Run from the project root, against a running service (one address, or several replicas
comma-separated; each client keeps one channel to one of them, spread round robin)::

    eval "$(medvault stack env --as physician)"
    .venv/bin/python bench/load.py --clients 8 --seconds 60

or on a local stack of its own, in a temporary MEDVAULT_HOME, with the DICOM listener on::

    .venv/bin/python bench/load.py --spawn --clients 8 --seconds 60

Each client is a thread with its own patient (a care-team grant for the clinician, made
by the records clerk first) and channel; it runs each operation once, then loops until
the time is up over a weighted mix: PutRecord (an HL7 v2 message, ~2 KiB), GetRecord of
one of its records (the bytes must hash to what was put), ListRecords, SignRecord
(CAdES, the clinician's signer), QueryEvents (as the security officer) and, when a DICOM
listener is given, C-STORE of a small CT instance (as the clerk, over one association
per client, for the first ``--dicom-senders`` clients: the listener allows one
certificate 4 associations by default). Each clinician call is one of the certificate's
concurrent calls, at most 8 by default (``server.max_calls_per_principal``): more
clients get RESOURCE_EXHAUSTED, as they should. Certificates: the clinician's from
``--cert``/``$MEDVAULT_CERT`` (its CN names the signer); the officer's and the clerk's
from ``--officer``/``--clerk`` (a ``client-NAME.pem`` beside the clinician's, as the
local stack issues them: ``officer-an`` and ``clerk-thu``).

Afterwards, as the officer: the ``records.read`` events of the run's patients in the
run's window must equal the successful reads exactly (per patient; none denied or
failed), the ``records.write`` events the successful puts and C-STOREs, and VerifyChain
must pass. The report gives throughput, p50/p95/p99 per operation and errors by status
code. Exit 0 on a clean run; 1 on any error or mismatch.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import ssl
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402
from google.protobuf.timestamp_pb2 import Timestamp  # noqa: E402

from service._gen.medvault.v1 import (  # noqa: E402  # noqa: E402
    access_pb2,
    access_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    signing_pb2,
    signing_pb2_grpc,
)
from service._gen.medvault.v1 import records_pb2 as pb  # noqa: E402
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc  # noqa: E402
from tests import content  # noqa: E402

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
    """Loop over the mix until ``deadline`` (monotonic): each operation once (put first),
    then drawn by weight."""
    tally = Tally()
    ops: dict[str, Callable[[], None]] = {
        "put": client.put, "get": client.get, "list": client.list, "sign": client.sign,
        "audit": client.audit_query, "store": client.store,
    }  # fmt: skip
    if not client.settings.dicom or client.index >= client.settings.dicom_senders:
        del ops["store"]
    names = list(ops)
    weights = [MIX[n] for n in names]
    first = iter(names)  # each operation once, put first; then at random by weight
    while time.monotonic() < deadline:
        op = next(first, "") or client.rng.choices(names, weights)[0]
        op = "put" if not client.stored else op
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


# -- the run -------------------------------------------------------------------------------


def setup(settings: Settings, run_id: str) -> list[pb.PatientId]:
    """One patient per client, with a care-team grant for the clinician."""
    patients = [pb.PatientId(id=f"LOAD-{run_id}-{i:03d}", assigning_authority=AUTHORITY)
                for i in range(settings.clients)]  # fmt: skip
    with settings.clerk.channel(settings.endpoints[0]) as channel:
        access = access_pb2_grpc.AccessServiceStub(channel)
        for patient in patients:
            access.GrantAccess(
                access_pb2.GrantAccessRequest(patient=patient, principal=settings.clinician.name),
                timeout=CALL_TIMEOUT,
            )
    return patients


def run(settings: Settings) -> tuple[Tally, list[pb.PatientId], datetime, datetime]:
    """Setup, then the clients for ``settings.seconds``; the tally and the run's window."""
    patients = setup(settings, uuid.uuid4().hex[:8])
    clients = [Client(settings, i, p) for i, p in enumerate(patients)]
    tallies: list[Tally] = []
    lock = threading.Lock()

    def body(client: Client, deadline: float) -> None:
        tally = run_client(client, deadline)
        with lock:
            tallies.append(tally)

    began = datetime.now(UTC)
    deadline = time.monotonic() + settings.seconds
    threads = [threading.Thread(target=body, args=(c, deadline)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ended = datetime.now(UTC)
    for c in clients:
        c.close()
    total = Tally()
    for tally in tallies:
        total.merge(tally)
    return total, patients, began, ended


@dataclass
class Check:
    """The audit trail against the run."""

    read_events: Counter[str] = field(default_factory=Counter)
    write_events: Counter[str] = field(default_factory=Counter)
    refused_events: int = 0  # records.read / records.write not ALLOWED
    chain_ok: bool = False
    chain_events: int = 0
    chain_reason: str = ""


def check(settings: Settings, tally: Tally, patients: list[pb.PatientId],
          began: datetime, ended: datetime) -> Check:  # fmt: skip
    """Count the run's read and write events per patient (as the officer), verify the chain."""
    result = Check()
    since, until = Timestamp(), Timestamp()
    # A second of margin for clocks (replicas on other machines): the patients are the
    # run's own, so nothing outside the run is counted.
    since.FromDatetime(began - timedelta(seconds=1))
    until.FromDatetime(ended + timedelta(seconds=1))
    with settings.officer.channel(settings.endpoints[0]) as channel:
        audit = audit_pb2_grpc.AuditServiceStub(channel)
        for patient in patients:
            request = audit_pb2.QueryEventsRequest(since=since, until=until, patient=patient)
            for event in audit.QueryEvents(request, timeout=CALL_TIMEOUT):
                if event.action not in ("records.read", "records.write"):
                    continue
                if event.outcome != audit_pb2.OUTCOME_ALLOWED:
                    result.refused_events += 1
                elif event.action == "records.read":
                    result.read_events[patient.id] += 1
                else:
                    result.write_events[patient.id] += 1
        reply = audit.VerifyChain(audit_pb2.VerifyChainRequest(), timeout=300)
    result.chain_ok, result.chain_events = reply.ok, reply.events_checked
    result.chain_reason = reply.reason
    return result


# -- the report ----------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def report(settings: Settings, tally: Tally, result: Check, seconds: float) -> dict[str, Any]:
    """The run as a JSON-ready dict, with the verdict (``clean``) and its reasons."""
    ops: dict[str, Any] = {}
    for op in MIX:
        ok = tally.latencies.get(op, [])
        errors = dict(tally.errors.get(op, {}))
        if not ok and not errors:
            continue
        ops[op] = {
            "ok": len(ok), "errors": errors, "per_second": len(ok) / seconds,
            **{f"p{q}_ms": _percentile(ok, q / 100) * 1000 for q in (50, 95, 99)},
        }  # fmt: skip
    problems = [f"{op}: {n} x {code}" for op, v in ops.items() for code, n in v["errors"].items()]
    reads, writes = sum(tally.reads.values()), sum(tally.writes.values())
    if result.read_events != tally.reads:
        problems.append(f"successful reads {reads} != read events "
                        f"{sum(result.read_events.values())} (or not per patient)")  # fmt: skip
    if result.write_events != tally.writes:
        problems.append(f"successful writes {writes} != write events "
                        f"{sum(result.write_events.values())} (or not per patient)")  # fmt: skip
    if result.refused_events:
        problems.append(f"{result.refused_events} read/write events not ALLOWED")
    if not result.chain_ok:
        problems.append(f"audit chain does not verify: {result.chain_reason}")
    return {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "endpoints": settings.endpoints, "clients": settings.clients, "seconds": seconds,
        "dicom": bool(settings.dicom), "ops": ops,
        "total_ok": sum(v["ok"] for v in ops.values()),
        "total_per_second": sum(v["ok"] for v in ops.values()) / seconds,
        "reads_ok": reads, "read_events": sum(result.read_events.values()),
        "writes_ok": writes, "write_events": sum(result.write_events.values()),
        "refused_events": result.refused_events, "chain_ok": result.chain_ok,
        "chain_events": result.chain_events, "problems": problems, "clean": not problems,
    }  # fmt: skip


def print_report(r: dict[str, Any]) -> None:
    print(f"\nmedvault load - {r['when']}: {r['clients']} clients, {r['seconds']:.1f} s, "
          f"{len(r['endpoints'])} endpoint(s), {os.cpu_count()} CPUs\n")  # fmt: skip
    print(f"{'op':<6} {'ok':>7} {'ops/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}  errors")
    for op, v in r["ops"].items():
        errors = ", ".join(f"{code} {n}" for code, n in v["errors"].items()) or "-"
        print(f"{op:<6} {v['ok']:>7} {v['per_second']:>8.1f} {v['p50_ms']:>8.1f} "
              f"{v['p95_ms']:>8.1f} {v['p99_ms']:>8.1f}  {errors}")  # fmt: skip
    print(f"{'all':<6} {r['total_ok']:>7} {r['total_per_second']:>8.1f}")
    print(f"\nreads OK {r['reads_ok']}, read events {r['read_events']}; writes OK "
          f"{r['writes_ok']}, write events {r['write_events']}; refused events "
          f"{r['refused_events']}; chain {'verifies' if r['chain_ok'] else 'DOES NOT verify'} "
          f"({r['chain_events']} events)")  # fmt: skip
    print("CLEAN" if r["clean"] else "NOT CLEAN:\n  " + "\n  ".join(r["problems"]))


# -- main ----------------------------------------------------------------------------------


def _sibling(cert: Path, name: str) -> tuple[Path, Path]:
    """``client-NAME.pem``/``.key`` beside ``cert`` (the local stack's layout)."""
    if name.endswith(".pem"):
        path = Path(name)
        return path, path.with_suffix(".key")
    return cert.parent / f"client-{name}.pem", cert.parent / f"client-{name}.key"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument(
        "--spawn",
        action="store_true",
        help="run on a local stack of its own (temporary MEDVAULT_HOME, DICOM on)",
    )
    p.add_argument(
        "--endpoint",
        default=os.environ.get("MEDVAULT_ENDPOINT", ""),
        help="HOST:PORT[,HOST:PORT...] (default $MEDVAULT_ENDPOINT)",
    )
    for name in ("ca", "cert", "key"):
        p.add_argument(
            f"--{name}",
            type=Path,
            default=os.environ.get(f"MEDVAULT_{name.upper()}"),
            help=f"(default $MEDVAULT_{name.upper()}); --cert: the clinician",
        )
    p.add_argument(
        "--officer",
        default="officer-an",
        help="security officer: a client name beside --cert, or a .pem (key beside)",
    )
    p.add_argument("--clerk", default="clerk-thu", help="records clerk: as --officer")
    p.add_argument("--dicom", default="", help="HOST:PORT of the DICOM listener (C-STORE)")
    p.add_argument("--dicom-ae", default="MEDVAULT")
    p.add_argument(
        "--dicom-senders",
        type=int,
        default=4,
        help="clients that C-STORE (the listener's share of one certificate)",
    )
    p.add_argument("--keep", action="store_true", help="--spawn: leave the stack running")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the report here")
    return p.parse_args(argv)


def settings_from(ns: argparse.Namespace) -> Settings:
    missing = [f"--{n}" for n in ("endpoint", "ca", "cert", "key") if not getattr(ns, n)]
    if missing:
        raise SystemExit(f"load: missing {', '.join(missing)}: run `eval \"$(medvault stack "
                         "env --as physician)\"`, pass them, or use --spawn")  # fmt: skip
    ca, cert, key = Path(ns.ca), Path(ns.cert), Path(ns.key)
    officer, clerk = _sibling(cert, ns.officer), _sibling(cert, ns.clerk)
    for path in (ca, cert, key, *officer, *clerk):
        if not path.is_file():
            raise SystemExit(f"load: {path} is not a file (see --officer, --clerk)")
    return Settings(
        endpoints=[e.strip() for e in ns.endpoint.split(",") if e.strip()],
        clinician=Tls.load(ca, cert, key), officer=Tls.load(ca, *officer),
        clerk=Tls.load(ca, *clerk), clients=max(1, ns.clients), seconds=ns.seconds,
        dicom=ns.dicom, dicom_ae=ns.dicom_ae, dicom_senders=ns.dicom_senders, seed=ns.seed,
    )  # fmt: skip


@contextlib.contextmanager
def spawned(ns: argparse.Namespace) -> Iterator[None]:
    """A local stack in a temporary home, with a DICOM listener; ``ns`` pointed at it."""
    from service.localstack.layout import port_free  # noqa: PLC0415
    from service.localstack.stack import LocalStack  # noqa: PLC0415

    home = Path(tempfile.mkdtemp(prefix="medvault-load-"))
    stack = LocalStack(home, report=lambda line: print(f"  [stack] {line}", flush=True))
    try:
        stack.prepare()
        port = next(p for p in range(21000, 30000) if port_free(p))
        config = stack.layout.config
        config.write_text(config.read_text() + f'\n[dicom]\nlisten = "127.0.0.1:{port}"\n'
                          f'ae_title = "{ns.dicom_ae}"\n')  # fmt: skip
        stack.up()
        tls = stack.tls_client("physician")
        ns.endpoint, ns.ca, ns.cert, ns.key = stack.endpoint(), tls.ca, tls.cert, tls.key
        ns.dicom = f"127.0.0.1:{port}"
        yield
    finally:
        if ns.keep:
            print(f"stack left running in {home} (MEDVAULT_HOME={home} medvault stack down)")
        else:
            stack.down()
            shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    with spawned(ns) if ns.spawn else contextlib.nullcontext():
        settings = settings_from(ns)
        tally, patients, began, ended = run(settings)
        result = check(settings, tally, patients, began, ended)
        r = report(settings, tally, result, (ended - began).total_seconds())
    print_report(r)
    if ns.json:
        ns.json.write_text(json.dumps(r, indent=1))
    return 0 if r["clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
