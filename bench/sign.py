"""SignRecord throughput vs a bare python-pkcs11 sign loop, same token, same key.

Run from the project root::

    .venv/bin/python bench/sign.py                 # 15 s per side
    .venv/bin/python bench/sign.py --seconds 5 --clients 8

It prepares its own local stack (``LocalStack``, as ``medvault stack up``) in a
temporary MEDVAULT_HOME, so the sample physician ``dr-lan`` has an EC P-256 signer key
and dev-CA certificate on the stack's SoftHSM2 token. The clerk writes one small record
(1 KiB) and grants dr-lan; then ``--clients`` threads call SignRecord as dr-lan for
``--seconds`` (each call: mutual TLS, authorization, grant check, audit event, decrypt
and hash the record, CAdES signed attributes, one ECDSA signature in the token, sealed
row insert, second audit event). The service is stopped, and this process then signs
SHA-256 digests with ``CKM_ECDSA`` on the same key with python-pkcs11 in a tight loop
for the same time. Printed: both rates and their ratio (target >= 0.7x). The exit
status is 0 whatever the result: a benchmark informs, it does not gate.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from service._gen.medvault.v1 import access_pb2 as apb  # noqa: E402
from service._gen.medvault.v1 import access_pb2_grpc as apb_grpc  # noqa: E402
from service._gen.medvault.v1 import records_pb2 as pb  # noqa: E402
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc  # noqa: E402
from service._gen.medvault.v1 import signing_pb2 as spb  # noqa: E402
from service._gen.medvault.v1 import signing_pb2_grpc as spb_grpc  # noqa: E402
from service.localstack.stack import LocalStack  # noqa: E402

TARGET = 0.7
SIGNER = "dr-lan"
PATIENT = pb.PatientId(id="BENCH-SIGN-0001", assigning_authority="BENCH")


def _channel(stack: LocalStack, role: str) -> grpc.Channel:
    tls = stack.tls_client(role)
    creds = grpc.ssl_channel_credentials(
        tls.ca.read_bytes(), tls.key.read_bytes(), tls.cert.read_bytes()
    )
    return grpc.secure_channel(
        stack.endpoint(), creds, options=[("grpc.use_local_subchannel_pool", 1)]
    )


def write_record(stack: LocalStack) -> str:
    """As the clerk: one 1 KiB record of the bench patient, and dr-lan's grant."""
    with _channel(stack, "records_clerk") as channel:
        header = pb.RecordHeader(patient=PATIENT, kind=pb.RECORD_KIND_OTHER,
                                 content_type="application/octet-stream")  # fmt: skip
        stream = iter([pb.PutRecordRequest(header=header),
                       pb.PutRecordRequest(chunk=os.urandom(1024))])  # fmt: skip
        record_id = str(pb_grpc.RecordServiceStub(channel).PutRecord(stream).id)
        apb_grpc.AccessServiceStub(channel).GrantAccess(
            apb.GrantAccessRequest(patient=PATIENT, principal=SIGNER)
        )
    return record_id


def grpc_rate(stack: LocalStack, record_id: str, clients: int, seconds: float) -> float:
    """SignRecord calls per second over ``clients`` threads."""
    counts = [0] * clients
    stop = threading.Event()
    request = spb.SignRecordRequest(record_id=record_id, signer=SIGNER)

    def worker(i: int) -> None:
        with _channel(stack, "physician") as channel:
            stub = spb_grpc.SigningServiceStub(channel)
            for _ in range(3):
                stub.SignRecord(request, timeout=30)  # warm-up
            while not stop.is_set():
                stub.SignRecord(request, timeout=30)
                counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(2)  # all warmed up
    start, first = time.perf_counter(), sum(counts)
    time.sleep(seconds)
    done, elapsed = sum(counts) - first, time.perf_counter() - start
    stop.set()
    for t in threads:
        t.join()
    return done / elapsed


def pkcs11_rate(stack: LocalStack, seconds: float) -> float:
    """Bare python-pkcs11: SHA-256 then CKM_ECDSA on dr-lan's key, one session, tight loop."""
    os.environ["SOFTHSM2_CONF"] = str(stack.layout.softhsm_dir / "softhsm2.conf")
    import pkcs11  # noqa: PLC0415  (after SOFTHSM2_CONF is set)
    from pkcs11 import Mechanism, ObjectClass  # noqa: PLC0415

    config = stack._config().keystore  # the stack's own config (a private helper)
    token = pkcs11.lib(config.module).get_token(token_label=config.token_label)
    pin = Path(config.pin_file).read_text().strip()
    with token.open(user_pin=pin) as session:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY,
                              label=f"medvault-signer-{SIGNER}")  # fmt: skip
        data = os.urandom(256)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            key.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA)
            done += 1
        return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    """Run both sides and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--home", type=Path, default=None)
    ns = parser.parse_args(argv)
    home = ns.home or Path(tempfile.mkdtemp(prefix="medvault-sign-bench-"))
    stack = LocalStack(home, report=lambda line: print(f"  [stack] {line}", flush=True))
    try:
        stack.up()
        record_id = write_record(stack)
        rpc = grpc_rate(stack, record_id, ns.clients, ns.seconds)
    finally:
        stack.down()
    bare = pkcs11_rate(stack, ns.seconds)
    ratio = rpc / bare if bare else 0.0
    print(f"SignRecord (gRPC, {ns.clients} clients, 1 KiB record): {rpc:8.1f} signatures/s")
    print(f"bare python-pkcs11 CKM_ECDSA loop (1 thread):        {bare:8.1f} signatures/s")
    verdict = "meets" if ratio >= TARGET else "misses"
    print(f"ratio {ratio:.2f}x ({verdict} the {TARGET}x target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
