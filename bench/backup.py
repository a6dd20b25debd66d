"""Backup and ``verify --read-data`` throughput against raw minio-SDK copy and GET.

Run from the project root::

    .venv/bin/python bench/backup.py            # 200 x 1 MiB + 4 x 16 MiB records
    .venv/bin/python bench/backup.py --quick    # 40 x 1 MiB + 1 x 16 MiB

It brings up its own local stack (``LocalStack(home).up()``) in a temporary
MEDVAULT_HOME, writes the records through PutRecord (gRPC, mutual TLS, as the records
clerk), then measures on the same SeaweedFS:

* **backup**: ``run_backup`` (what ``medvault backup run`` and the scheduler run) into a
  fresh, empty bucket, so every object is copied; MB/s = ciphertext bytes copied /
  wall time of the whole run (snapshot, objects, signed manifest included).
* **raw copy**: the same objects, ``get_object`` streamed into ``put_object`` (no
  server-side copy) into another fresh bucket, with the same number of parallel
  workers as the backup (``--workers``, the ``[backup] workers`` default 4).
* **verify**: ``verify_backup(read_data=True)`` of that backup: signature, listing,
  every object re-read and hashed; MB/s = bytes read / wall time.
* **raw GET**: the same objects read whole with ``get_object``, same workers.

Raw and medvault runs alternate for ``--rounds`` rounds; the best round of each counts
(a noisy neighbour slows one round, not the method). Targets: backup >= 0.5x raw copy,
verify >= 0.7x raw GET. The exit status is always 0: a benchmark informs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keystore import Pkcs11SessionPool  # noqa: E402  (after the path fix)
from keystore.signing import Pkcs11Signer  # noqa: E402
from service import config as service_config  # noqa: E402
from service._gen.medvault.v1 import records_pb2 as pb  # noqa: E402
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc  # noqa: E402
from service.bootstrap import blob_store, keystore_config  # noqa: E402
from service.localstack.stack import LocalStack  # noqa: E402
from storage.backup.runner import run_backup, source_identity  # noqa: E402
from storage.backup.targets import S3Target  # noqa: E402
from storage.backup.verify import verify_backup  # noqa: E402
from storage.s3_blobs import make_minio_client  # noqa: E402
from storage.sql_metadata import make_engine  # noqa: E402

MIB = 1 << 20
CHUNK = MIB
PATIENT = pb.PatientId(id="BENCH-BACKUP", assigning_authority="BENCH")
BACKUP_TARGET, VERIFY_TARGET = 0.5, 0.7
BACKUP_KEY = "medvault-backup-v1"


def _channel(stack: LocalStack, role: str) -> grpc.Channel:
    tls = stack.tls_client(role)
    creds = grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(),
        private_key=tls.key.read_bytes(),
        certificate_chain=tls.cert.read_bytes(),
    )
    options = [("grpc.max_send_message_length", 4 * MIB)]
    return grpc.secure_channel(stack.endpoint(), creds, options=options)


def write_records(stack: LocalStack, sizes: list[int]) -> int:
    """PutRecord each size (random, incompressible content); the plaintext bytes written."""
    with _channel(stack, "records_clerk") as channel:
        stub = pb_grpc.RecordServiceStub(channel)
        for size in sizes:
            data = os.urandom(size)

            def requests(data: bytes = data) -> Iterator[pb.PutRecordRequest]:
                yield pb.PutRecordRequest(header=pb.RecordHeader(
                    patient=PATIENT, kind=pb.RECORD_KIND_OTHER,
                    content_type="application/octet-stream",
                    expected_sha256=hashlib.sha256(data).digest(),
                ))  # fmt: skip
                for i in range(0, len(data), CHUNK):
                    yield pb.PutRecordRequest(chunk=data[i : i + CHUNK])

            stub.PutRecord(requests(), timeout=600)
    return sum(sizes)


class Bench:
    """The stack's database, record bucket, token and a raw client, opened once."""

    def __init__(self, stack: LocalStack, workers: int) -> None:
        self.config = service_config.load(stack.layout.config)
        s3 = self.config.s3
        self.client = make_minio_client(
            s3.endpoint,
            service_config.read_secret(s3.access_key_env, s3.access_key_file),
            service_config.read_secret(s3.secret_key_env, s3.secret_key_file),
            secure=s3.secure, ca_file=s3.ca_file or None,
        )  # fmt: skip
        self.engine = make_engine(self.config.database.url)
        self.blobs = blob_store(self.config)
        self.pool = Pkcs11SessionPool(keystore_config(self.config))
        self.signer = Pkcs11Signer(self.pool, BACKUP_KEY)
        self.workers = workers
        self.part_size = s3.part_size
        self.objects = [
            (o.object_name, int(o.size or 0))
            for o in self.client.list_objects(self.blobs.bucket, recursive=True)
        ]
        self.bytes = sum(size for _, size in self.objects)
        self.buckets: list[str] = []

    def close(self) -> None:
        for bucket in self.buckets:  # throw-away buckets of this run
            for o in self.client.list_objects(bucket, recursive=True):
                self.client.remove_object(bucket, o.object_name)
            self.client.remove_bucket(bucket)
        self.pool.close()
        self.engine.dispose()

    def fresh_bucket(self, prefix: str) -> str:
        name = f"{prefix}-{secrets.token_hex(4)}"
        self.client.make_bucket(name)
        self.buckets.append(name)
        return name

    def _parallel(self, fn: Callable[[tuple[str, int]], int]) -> int:
        with ThreadPoolExecutor(self.workers) as pool:
            return sum(pool.map(fn, self.objects))

    def raw_copy(self) -> tuple[float, int]:
        """Every record object: GET streamed into PUT, into a fresh bucket."""
        bucket = self.fresh_bucket("bench-rawcopy")

        def copy(item: tuple[str, int]) -> int:
            key, size = item
            response = self.client.get_object(self.blobs.bucket, key)
            try:
                self.client.put_object(bucket, key, response, size, part_size=self.part_size)
            finally:
                response.close()
                response.release_conn()
            return size

        start = time.perf_counter()
        copied = self._parallel(copy)
        return time.perf_counter() - start, copied

    def raw_get(self) -> tuple[float, int]:
        """Every record object read whole."""

        def get(item: tuple[str, int]) -> int:
            response = self.client.get_object(self.blobs.bucket, item[0])
            try:
                return sum(len(c) for c in response.stream(MIB))
            finally:
                response.close()
                response.release_conn()

        start = time.perf_counter()
        read = self._parallel(get)
        return time.perf_counter() - start, read

    def backup(self) -> tuple[float, int, S3Target, str]:
        """``run_backup`` into a fresh bucket (everything copied)."""
        target = S3Target(self.client, self.fresh_bucket("bench-backup"))
        source = source_identity(self.engine, self.blobs.bucket, self.config.s3.endpoint)
        start = time.perf_counter()
        result = run_backup(
            self.engine, self.blobs, target, self.signer, source, workers=self.workers
        )
        return time.perf_counter() - start, result.copied_bytes, target, result.backup_id

    def verify(self, target: S3Target, backup_id: str) -> tuple[float, int]:
        start = time.perf_counter()
        report = verify_backup(
            target, backup_id, trusted_public_key=self.signer.public_key_der(),
            read_data=True, workers=self.workers,
        )  # fmt: skip
        if not report.ok:
            raise SystemExit(f"verify failed: {report.failures[:3]}")
        return time.perf_counter() - start, report.bytes_read


def _rate(seconds: float, size: int) -> float:
    return size / MIB / seconds if seconds > 0 else 0.0


def measure(bench: Bench, rounds: int) -> dict[str, float]:
    """Best MB/s of each method over ``rounds`` alternating rounds."""
    best = {"raw copy": 0.0, "backup": 0.0, "raw GET": 0.0, "verify": 0.0}
    for n in range(1, rounds + 1):
        seconds, size = bench.raw_copy()
        best["raw copy"] = max(best["raw copy"], _rate(seconds, size))
        seconds, size, target, backup_id = bench.backup()
        best["backup"] = max(best["backup"], _rate(seconds, size))
        seconds, size = bench.raw_get()
        best["raw GET"] = max(best["raw GET"], _rate(seconds, size))
        seconds, size = bench.verify(target, backup_id)
        best["verify"] = max(best["verify"], _rate(seconds, size))
        print(f"  round {n}/{rounds} done", flush=True)
    return best


def report(best: dict[str, float], bench: Bench) -> None:
    print(f"\n{len(bench.objects)} objects, {bench.bytes / MIB:.0f} MiB of ciphertext, "
          f"{bench.workers} workers each side\n")  # fmt: skip
    print(f"{'method':<10} {'MiB/s':>8}")
    for name, rate in best.items():
        print(f"{name:<10} {rate:8.1f}")
    print()
    for what, base, target in (("backup", "raw copy", BACKUP_TARGET),
                               ("verify", "raw GET", VERIFY_TARGET)):  # fmt: skip
        ratio = best[what] / best[base] if best[base] else 0.0
        verdict = "PASS" if ratio >= target else "MISS"
        print(f"{what} / {base}: {ratio:.2f}x (target >= {target}x) {verdict}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 x 1 MiB + 1 x 16 MiB")
    parser.add_argument("--small", type=int, help="number of 1 MiB records (default 200)")
    parser.add_argument("--large", type=int, help="number of 16 MiB records (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    parser.add_argument("--workers", type=int, default=4, help="parallel transfers (default 4)")
    parser.add_argument("--home", type=Path, help="stack home (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    small = ns.small if ns.small is not None else (40 if ns.quick else 200)
    large = ns.large if ns.large is not None else (1 if ns.quick else 4)
    home = ns.home or Path(tempfile.mkdtemp(prefix="medvault-bench-"))
    stack = LocalStack(home, report=lambda line: print(f"  [stack] {line}", flush=True))
    try:
        stack.up()
        start = time.perf_counter()
        written = write_records(stack, [MIB] * small + [16 * MIB] * large)
        print(f"  wrote {small + large} records ({written / MIB:.0f} MiB) in "
              f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
        bench = Bench(stack, ns.workers)
        try:
            report(measure(bench, ns.rounds), bench)
        finally:
            bench.close()
    finally:
        if not ns.keep:
            stack.down()
            if ns.home is None:
                shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
