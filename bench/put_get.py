"""PutRecord/GetRecord throughput through gRPC + mutual TLS vs raw S3 on the same SeaweedFS.

Run from the project root::

    .venv/bin/python bench/put_get.py            # full run (about 5-10 minutes on 2 cores)
    .venv/bin/python bench/put_get.py --quick    # smoke run (about a minute)

It brings up its own local stack (``LocalStack(home).up()``, exactly what ``medvault
stack up`` runs) in a temporary MEDVAULT_HOME, measures, and stops the processes at the
end. The raw baseline writes to a separate bucket of the *same* SeaweedFS with a minio
client built by the same ``make_minio_client`` the service uses, streaming with the same
16 MiB part size and one upload at a time; its GET reads the whole body.

Medvault and raw operations are interleaved (A B A B ...) so that a noisy neighbour on a
shared machine slows both alike; the figures are medians. The exit status is always 0:
a benchmark informs, it does not gate.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service import config as service_config  # noqa: E402  (after the path fix)
from service._gen.medvault.v1 import access_pb2, access_pb2_grpc  # noqa: E402
from service._gen.medvault.v1 import records_pb2 as pb  # noqa: E402
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc  # noqa: E402
from service.localstack.stack import LocalStack  # noqa: E402
from storage.s3_blobs import make_minio_client  # noqa: E402

KIB, MIB = 1 << 10, 1 << 20
CHUNK = 1 * MIB  # what the CLI streams
MAX_MESSAGE = 4 * MIB  # the CLI's channel limit
BENCH_PATIENT = pb.PatientId(id="BENCH-0001", assigning_authority="BENCH")
RAW_BUCKET = "bench-raw"
RAW_READ = 1 * MIB

SIZES = {"4KiB": 4 * KIB, "1MiB": 1 * MIB, "64MiB": 64 * MIB}
FULL_OPS = {"4KiB": 300, "1MiB": 40, "64MiB": 5}
QUICK_OPS = {"4KiB": 60, "1MiB": 10, "64MiB": 2}
# Throughput targets (medvault / raw) and the small-record latency target (medvault / raw).
THROUGHPUT_TARGET = 0.8
LATENCY_TARGET = 2.0


@dataclass
class Samples:
    """Per-operation wall times, seconds."""

    medvault: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)


# -- the two clients -------------------------------------------------------------------


def _channel(stack: LocalStack, role: str) -> grpc.Channel:
    tls = stack.tls_client(role)
    creds = grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(),
        private_key=tls.key.read_bytes(),
        certificate_chain=tls.cert.read_bytes(),
    )
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ]
    return grpc.secure_channel(stack.endpoint(), creds, options=options)


class Medvault:
    """gRPC clients over mutual TLS, streaming 1 MiB chunks as the CLI does.

    The real access path: the records clerk writes, puts the sample physician on the
    patient's care team, and the physician reads (grant check and audit on every read).
    """

    def __init__(self, stack: LocalStack) -> None:
        self._writer = _channel(stack, "records_clerk")
        self._reader = _channel(stack, "physician")
        self._stub = pb_grpc.RecordServiceStub(self._writer)
        self._read_stub = pb_grpc.RecordServiceStub(self._reader)
        access_pb2_grpc.AccessServiceStub(self._writer).GrantAccess(
            access_pb2.GrantAccessRequest(patient=BENCH_PATIENT, principal="dr-lan")
        )

    def close(self) -> None:
        self._writer.close()
        self._reader.close()

    def put(self, chunks: list[bytes], digest: bytes) -> str:
        def requests() -> Iterator[pb.PutRecordRequest]:
            yield pb.PutRecordRequest(
                header=pb.RecordHeader(
                    patient=BENCH_PATIENT,
                    kind=pb.RECORD_KIND_OTHER,
                    content_type="application/octet-stream",
                    title="benchmark",
                    expected_sha256=digest,  # as the CLI sends it
                )
            )
            for chunk in chunks:
                yield pb.PutRecordRequest(chunk=chunk)

        return str(self._stub.PutRecord(requests()).id)

    def get(self, record_id: str) -> int:
        total = 0
        for response in self._read_stub.GetRecord(pb.GetRecordRequest(id=record_id)):
            if response.WhichOneof("message") == "chunk":
                total += len(response.chunk)
        return total


class Raw:
    """The minio SDK straight against a bucket of the same SeaweedFS."""

    def __init__(self, stack: LocalStack) -> None:
        config = service_config.load(stack.layout.config)
        s3 = config.s3
        self._client = make_minio_client(
            s3.endpoint,
            service_config.read_secret(s3.access_key_env, s3.access_key_file),
            service_config.read_secret(s3.secret_key_env, s3.secret_key_file),
            secure=s3.secure,
            ca_file=s3.ca_file or None,
        )
        self._part_size = s3.part_size
        if not self._client.bucket_exists(RAW_BUCKET):
            self._client.make_bucket(RAW_BUCKET)
        self._count = 0

    def put(self, data: bytes) -> str:
        self._count += 1
        key = f"raw/{self._count:06d}"
        # As S3BlobStore.put: unknown length, same part size, one part in flight.
        self._client.put_object(
            RAW_BUCKET, key, io.BytesIO(data), length=-1,
            part_size=self._part_size, num_parallel_uploads=1,
        )  # fmt: skip
        return key

    def get(self, key: str) -> int:
        response = self._client.get_object(RAW_BUCKET, key)
        total = 0
        try:
            while chunk := response.read(RAW_READ):
                total += len(chunk)
        finally:
            response.close()
            response.release_conn()
        return total


class Floor:
    """gRPC + mutual TLS with nothing behind it: a server process that streams the
    requested number of bytes from memory, in 1 MiB messages, with the stack's
    certificates. No store can make GetRecord faster than this transport."""

    def __init__(self, stack: LocalStack) -> None:
        ca_dir = stack.layout.ca_dir
        self._process = subprocess.Popen(
            [sys.executable, __file__, "--floor-server", str(ca_dir)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self._process.stdout is not None
        port = int(self._process.stdout.readline())
        tls = stack.tls_client("physician")
        creds = grpc.ssl_channel_credentials(
            tls.ca.read_bytes(), tls.key.read_bytes(), tls.cert.read_bytes()
        )
        options = [("grpc.max_receive_message_length", MAX_MESSAGE),
                   ("grpc.ssl_target_name_override", "localhost")]  # fmt: skip
        self._channel = grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options)
        self._stub = pb_grpc.RecordServiceStub(self._channel)

    def get(self, size: int) -> int:
        request = pb.GetRecordRequest(range=pb.ByteRange(length=size))
        return sum(len(r.chunk) for r in self._stub.GetRecord(request))

    def close(self) -> None:
        self._channel.close()
        self._process.kill()
        self._process.wait()


def floor_server(ca_dir: Path) -> None:
    """Serve GetRecord from memory (``--floor-server``); print the port, run until killed."""
    import asyncio  # noqa: PLC0415

    from grpc import aio  # noqa: PLC0415

    block = os.urandom(MIB)

    class Servicer(pb_grpc.RecordServiceServicer):  # type: ignore[misc]
        async def GetRecord(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
            yield pb.GetRecordResponse(metadata=pb.Record(id="floor"))
            left = request.range.length
            while left > 0:
                yield pb.GetRecordResponse(chunk=block[: min(left, MIB)])
                left -= min(left, MIB)

    async def serve() -> None:
        server = aio.server(options=[("grpc.max_send_message_length", MAX_MESSAGE)])
        pb_grpc.add_RecordServiceServicer_to_server(Servicer(), server)
        creds = grpc.ssl_server_credentials(
            [((ca_dir / "server.key").read_bytes(), (ca_dir / "server.pem").read_bytes())],
            root_certificates=(ca_dir / "ca.pem").read_bytes(),
            require_client_auth=True,
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()

    asyncio.run(serve())


def measure_floor(floor: Floor, size: int, ops: int) -> list[float]:
    """Wall times of ``ops`` transport-only gets of ``size`` bytes."""
    floor.get(size)  # warm-up
    return [_timed(lambda: floor.get(size))[0] for _ in range(ops)]


# -- measuring -------------------------------------------------------------------------


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure_size(
    name: str, size: int, ops: int, medvault: Medvault, raw: Raw
) -> tuple[Samples, Samples]:
    """``ops`` puts then ``ops`` gets of each kind, interleaved A B A B; one warm-up each."""
    data = os.urandom(size)  # incompressible, so nobody gains from compression
    chunks = [data[i : i + CHUNK] for i in range(0, size, CHUNK)]
    digest = hashlib.sha256(data).digest()
    medvault.put(chunks, digest)  # warm-up: connections, TLS sessions, code paths
    raw.put(data)
    puts, gets = Samples(), Samples()
    ids: list[str] = []
    keys: list[str] = []
    for _ in range(ops):
        elapsed, record_id = _timed(lambda: medvault.put(chunks, digest))
        puts.medvault.append(elapsed)
        ids.append(str(record_id))
        elapsed, key = _timed(lambda: raw.put(data))
        puts.raw.append(elapsed)
        keys.append(str(key))
    medvault.get(ids[0])
    raw.get(keys[0])
    for record_id, key in zip(ids, keys, strict=True):
        elapsed, got = _timed(lambda: medvault.get(record_id))  # noqa: B023  (called at once)
        if got != size:
            raise SystemExit(f"GetRecord returned {got} bytes, expected {size}")
        gets.medvault.append(elapsed)
        elapsed, got = _timed(lambda: raw.get(key))  # noqa: B023
        if got != size:
            raise SystemExit(f"raw GET returned {got} bytes, expected {size}")
        gets.raw.append(elapsed)
    print(f"  {name}: {ops} ops of each kind done", flush=True)
    return puts, gets


# -- reporting -------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the result table."""

    size_name: str
    size: int
    op: str
    raw_p50: float
    medvault_p50: float
    raw_p90: float
    medvault_p90: float

    @property
    def latency_bound(self) -> bool:
        return self.size < MIB

    def figures(self) -> tuple[str, str, float]:
        """Raw and medvault figures as text, and the ratio medvault/raw of them."""
        if self.latency_bound:
            return (f"{self.raw_p50 * 1e3:.2f} ms", f"{self.medvault_p50 * 1e3:.2f} ms",
                    self.medvault_p50 / self.raw_p50)  # fmt: skip
        raw_mbs = self.size / self.raw_p50 / 1e6
        mv_mbs = self.size / self.medvault_p50 / 1e6
        return f"{raw_mbs:.1f} MB/s", f"{mv_mbs:.1f} MB/s", mv_mbs / raw_mbs

    def target(self) -> tuple[str, bool] | None:
        """The target this row is judged by, and whether it is met; None if none."""
        _, _, ratio = self.figures()
        if not self.latency_bound:
            return f">= {THROUGHPUT_TARGET}x raw MB/s", ratio >= THROUGHPUT_TARGET
        if self.op == "get":
            return f"p50 <= {LATENCY_TARGET}x raw p50", ratio <= LATENCY_TARGET
        return None


def rows_for(name: str, size: int, puts: Samples, gets: Samples) -> list[Row]:
    def row(op: str, s: Samples) -> Row:
        return Row(name, size, op, statistics.median(s.raw), statistics.median(s.medvault),
                   _p90(s.raw), _p90(s.medvault))  # fmt: skip

    return [row("put", puts), row("get", gets)]


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def print_table(rows: list[Row], ops: dict[str, int]) -> None:
    header = (f"{'size':>6} {'op':<4} {'n':>4} {'raw':>12} {'medvault':>12} {'mv/raw':>7}"
              f" {'raw p50/p90 ms':>17} {'mv p50/p90 ms':>17}  target")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in rows:
        raw, mv, ratio = r.figures()
        target = r.target()
        verdict = "-" if target is None else f"{'PASS' if target[1] else 'MISS'} ({target[0]})"
        print(
            f"{r.size_name:>6} {r.op:<4} {ops[r.size_name]:>4} {raw:>12} {mv:>12} {ratio:>6.2f}x"
            f" {r.raw_p50 * 1e3:>8.2f}/{r.raw_p90 * 1e3:<8.2f}"
            f" {r.medvault_p50 * 1e3:>8.2f}/{r.medvault_p90 * 1e3:<8.2f}  {verdict}"
        )
    print("MB/s = 10^6 bytes per second of plaintext, from the median op time; "
          "4 KiB rows are p50 latencies (ratio: medvault/raw, lower is better).")  # fmt: skip


# -- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"fewer ops: {QUICK_OPS}")
    for flag, name in (("--ops-4k", "4KiB"), ("--ops-1m", "1MiB"), ("--ops-64m", "64MiB")):
        p.add_argument(flag, type=int, help=f"ops per kind for {name} (default {FULL_OPS[name]})")
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated subset of sizes")
    p.add_argument("--home", type=Path, help="stack home to use (default: a fresh temp dir)")
    p.add_argument("--keep", action="store_true", help="leave the stack running and the home")
    p.add_argument("--json", type=Path, help="also write the raw samples here")
    return p.parse_args(argv)


def _ops(ns: argparse.Namespace) -> dict[str, int]:
    ops = dict(QUICK_OPS if ns.quick else FULL_OPS)
    for name, flag in (("4KiB", ns.ops_4k), ("1MiB", ns.ops_1m), ("64MiB", ns.ops_64m)):
        if flag is not None:
            ops[name] = max(1, flag)
    return ops


def run(ns: argparse.Namespace, stack: LocalStack) -> None:
    ops = _ops(ns)
    names = [n.strip() for n in ns.sizes.split(",") if n.strip()]
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        raise SystemExit(f"unknown sizes {unknown}; known: {', '.join(SIZES)}")
    medvault, raw, floor = Medvault(stack), Raw(stack), Floor(stack)
    pid = stack.layout.service_pid.read_text().strip()
    print(f"service pid {pid}, endpoint {stack.endpoint()}", flush=True)
    rows: list[Row] = []
    samples: dict[str, object] = {}
    floors: dict[str, float] = {}
    try:
        for name in names:
            puts, gets = measure_size(name, SIZES[name], ops[name], medvault, raw)
            rows += rows_for(name, SIZES[name], puts, gets)
            samples[name] = {"put": puts.__dict__, "get": gets.__dict__}
            floors[name] = statistics.median(measure_floor(floor, SIZES[name], ops[name]))
            floors[name + " raw"] = statistics.median(gets.raw)
    finally:
        medvault.close()
        floor.close()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\nmedvault vs raw minio SDK on the same SeaweedFS - {when}, "
          f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}\n")  # fmt: skip
    print_table(rows, ops)
    print("\ntransport floor: GetRecord over gRPC + mutual TLS from a server holding the bytes")
    print("in memory (no S3, no database, no token, no decryption), same client and certificates")
    for name in names:
        best = floors[name + " raw"] / (floors[name + " raw"] + floors[name])
        floor_ms, raw_ms = floors[name] * 1000, floors[name + " raw"] * 1000
        print(f"  {name:>6}  floor p50 {floor_ms:8.2f} ms   raw S3 GET p50 {raw_ms:8.2f} ms"
              f"   best serial ratio ~{best:.2f}x")  # fmt: skip
    if ns.json:
        ns.json.write_text(json.dumps({"when": when, "ops": ops, "samples": samples}, indent=1))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--floor-server"]:
        floor_server(Path(argv[1]))
        return 0
    ns = parse_args(argv)
    home = ns.home or Path(tempfile.mkdtemp(prefix="medvault-bench-"))
    stack = LocalStack(home, report=lambda line: print(f"  [stack] {line}", flush=True))
    try:
        stack.up()
        run(ns, stack)
    finally:
        if not ns.keep:
            stack.down()
            if ns.home is None:
                shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
