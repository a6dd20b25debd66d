"""Issue 12's yardsticks in one run: medvault against raw S3 and the gRPC transport floor.

Run from the project root::

    .venv/bin/python bench/put_get.py            # full run (about 10 minutes on 2 cores)
    .venv/bin/python bench/put_get.py --quick    # smoke run (well under a minute)

It brings up its own local stack (``LocalStack(home).up()``, exactly what ``medvault
stack up`` runs) in a temporary MEDVAULT_HOME, measures, and stops the processes at the
end. Three things are measured against each other, on the same SeaweedFS, in the same run:

* **medvault**: PutRecord / GetRecord over gRPC + mutual TLS, 1 MiB chunks (the
  service's ``chunk_size``) as the CLI streams them; the records clerk writes, the
  physician (with a care-team grant) reads, so every read passes the grant check and
  commits its audit event.
* **raw S3**: the minio SDK from the service's own ``make_minio_client``, same endpoint,
  credentials and signing, a separate bucket; puts stream with ``length=-1``, the
  service's part size and one part in flight (as ``S3BlobStore.put``), gets read the
  whole body.
* **transport floor**: a trivial grpc.aio server (``--floor-server``) with the
  service's TLS setup (its certificate, client CA, client certificates required) and
  its channel options (``service.server.server_options``): GetRecord streams a metadata
  message and pre-made chunks of ``chunk_size`` from memory, PutRecord receives the
  stream and discards it. Same client, same messages. No store can beat it.

Yardsticks: ``medvault p50 / (raw p50 + floor p50)`` at one client for each size and
direction (operations interleaved medvault, raw, floor, ... so a noisy neighbour slows
all alike), and throughput at 1, 4 and 16 clients (threads, each with its own
connection) against raw S3 at the same concurrency (timed phases of medvault, raw and
floor over several rounds, the order rotated each round). The floor's throughput
(``floor/s``, ``mv/floor``) is the transport's ceiling on this host at that concurrency:
when the throughput target (``THROUGHPUT_TARGET`` x raw) is above it, the verdict's
detail says so (the verdict itself is unchanged). Service CPU per operation is read
from ``/proc/PID/stat`` (utime + stime) of the service process and all its descendants
(worker processes), and the floor server's likewise. The exit status is always 0: a
benchmark informs, it does not gate.

Both the floor server and the bench's client process call ``service.allocator.tune()``
at start, as the service's ``serve()`` does: the floor is what the transport costs, and
must not pay for glibc trimming the heap under every large message when the service no
longer does; and the clients of all three kinds run under the same allocator settings.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service import allocator  # noqa: E402  (after the path fix)
from service import config as service_config  # noqa: E402
from service._gen.medvault.v1 import access_pb2, access_pb2_grpc  # noqa: E402
from service._gen.medvault.v1 import records_pb2 as pb  # noqa: E402
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc  # noqa: E402
from service.localstack.seaweed import SeaweedServer  # noqa: E402
from service.localstack.service_proc import ServiceProcess  # noqa: E402
from service.localstack.stack import LocalStack  # noqa: E402
from storage.s3_blobs import make_minio_client  # noqa: E402

KIB, MIB = 1 << 10, 1 << 20
CHUNK = 1 * MIB  # what the CLI streams (and the service's default chunk_size)
MAX_MESSAGE = 4 * MIB  # the CLI's channel limit
BENCH_PATIENT = pb.PatientId(id="BENCH-0001", assigning_authority="BENCH")
RAW_BUCKET = "bench-raw"
RAW_READ = 1 * MIB

SIZES = {"4KiB": 4 * KIB, "512KiB": 512 * KIB, "1MiB": 1 * MIB, "64MiB": 64 * MIB}
FULL_OPS = {"4KiB": 200, "512KiB": 60, "1MiB": 40, "64MiB": 4}
QUICK_OPS = {"4KiB": 8, "512KiB": 4, "1MiB": 3, "64MiB": 1}
OPS_FLAGS = {"4KiB": "ops_4k", "512KiB": "ops_512k", "1MiB": "ops_1m", "64MiB": "ops_64m"}
# Targets of issue 12.
LATENCY_TARGET = 1.3  # medvault p50 <= 1.3 x (raw p50 + floor p50), 1 client
THROUGHPUT_TARGET = 0.8  # medvault/s >= 0.8 x raw/s at 16 clients, 512 KiB
THROUGHPUT_TARGET_SIZE, THROUGHPUT_TARGET_CLIENTS = "512KiB", 16

T = TypeVar("T")


# -- CPU of a process tree -------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and all its live descendants (all threads)."""
    tree, todo, total = _children(), [pid], 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
        todo += tree.get(current, [])
    return total


# -- the three clients -----------------------------------------------------------------


def _credentials(stack: LocalStack, role: str) -> grpc.ChannelCredentials:
    tls = stack.tls_client(role)
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(),
        private_key=tls.key.read_bytes(),
        certificate_chain=tls.cert.read_bytes(),
    )


def _channel(stack: LocalStack, role: str, target: str | None = None) -> grpc.Channel:
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        # A connection of its own per client object (concurrent clients do not share one).
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if target is not None:
        options.append(("grpc.ssl_target_name_override", "localhost"))
    return grpc.secure_channel(target or stack.endpoint(), _credentials(stack, role), options)


def _put_requests(chunks: list[bytes], digest: bytes) -> Iterator[pb.PutRecordRequest]:
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


class Medvault:
    """gRPC clients over mutual TLS, streaming 1 MiB chunks as the CLI does.

    The real access path: the records clerk writes, puts the sample physician on the
    patient's care team (``grant``; once per stack is enough), and the physician reads
    (grant check and audit on every read).
    """

    def __init__(self, stack: LocalStack, grant: bool = True) -> None:
        self._writer = _channel(stack, "records_clerk")
        self._reader = _channel(stack, "physician")
        self._stub = pb_grpc.RecordServiceStub(self._writer)
        self._read_stub = pb_grpc.RecordServiceStub(self._reader)
        if grant:
            access_pb2_grpc.AccessServiceStub(self._writer).GrantAccess(
                access_pb2.GrantAccessRequest(patient=BENCH_PATIENT, principal="dr-lan")
            )

    def close(self) -> None:
        self._writer.close()
        self._reader.close()

    def put(self, chunks: list[bytes], digest: bytes) -> str:
        return str(self._stub.PutRecord(_put_requests(chunks, digest)).id)

    def get(self, record_id: str) -> int:
        total = 0
        for response in self._read_stub.GetRecord(pb.GetRecordRequest(id=record_id)):
            if response.WhichOneof("message") == "chunk":
                total += len(response.chunk)
        return total


class Raw:
    """The minio SDK straight against a bucket of the same SeaweedFS, built by the
    service's own client factory from the service's configuration."""

    _counter = 0
    _lock = threading.Lock()

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
        with Raw._lock:
            if not self._client.bucket_exists(RAW_BUCKET):
                self._client.make_bucket(RAW_BUCKET)

    def close(self) -> None:
        pass

    def put(self, chunks: list[bytes], digest: bytes) -> str:
        del digest  # the SDK signs the payload itself
        with Raw._lock:
            Raw._counter += 1
            key = f"raw/{Raw._counter:07d}"
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
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


class FloorServer:
    """The ``--floor-server`` process: its port and pid."""

    def __init__(self, stack: LocalStack) -> None:
        """Start it (it needs the prepared config and certificates, not the stack)."""
        self._process = subprocess.Popen(
            [sys.executable, __file__, "--floor-server", str(stack.layout.config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip  (stdin: its end tells the server this bench is gone, however it died)
        self.pid = self._process.pid
        self._port = 0

    @property
    def port(self) -> int:
        """Its port, once it listens (waits for it)."""
        if not self._port:
            assert self._process.stdout is not None
            line = self._process.stdout.readline()
            if not line.strip().isdigit():
                self._process.kill()
                raise SystemExit("the transport-floor server did not start (see stderr above)")
            self._port = int(line)
        return self._port

    def close(self) -> None:
        self._process.kill()
        self._process.wait()


class Floor:
    """A client of the floor server: the same messages as medvault's, nothing behind them.
    ``get`` takes the size to stream (the floor has no records)."""

    def __init__(self, stack: LocalStack, server: FloorServer) -> None:
        self._channel = _channel(stack, "physician", f"127.0.0.1:{server.port}")
        self._stub = pb_grpc.RecordServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def put(self, chunks: list[bytes], digest: bytes) -> str:
        return str(self._stub.PutRecord(_put_requests(chunks, digest)).id)

    def get(self, size: int) -> int:
        request = pb.GetRecordRequest(range=pb.ByteRange(length=size))
        total = 0
        for response in self._stub.GetRecord(request):
            if response.WhichOneof("message") == "chunk":
                total += len(response.chunk)
        return total


def floor_server(config_path: Path) -> None:
    """Serve the floor (``--floor-server CONFIG``); print the port, run until killed or
    until stdin ends (the bench that started it exited, even by a signal).

    grpc.aio like the service, the service's server credentials and channel options;
    GetRecord streams a metadata message then pre-made ``chunk_size`` chunks, PutRecord
    receives every message and discards it. glibc's thresholds are fixed first, as the
    service's ``serve()`` does (``service.allocator``).
    """
    import asyncio  # noqa: PLC0415

    from grpc import aio  # noqa: PLC0415

    from service.server import server_options  # noqa: PLC0415

    allocator.tune()
    config = service_config.load(config_path)
    chunk_size = config.server.chunk_size
    block = os.urandom(chunk_size)
    tails: dict[int, bytes] = {}

    class Servicer(pb_grpc.RecordServiceServicer):  # type: ignore[misc]
        async def GetRecord(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
            yield pb.GetRecordResponse(metadata=pb.Record(id="floor"))
            left = request.range.length
            while left >= chunk_size:
                yield pb.GetRecordResponse(chunk=block)
                left -= chunk_size
            if left:
                tail = tails.get(left) or tails.setdefault(left, block[:left])
                yield pb.GetRecordResponse(chunk=tail)

        async def PutRecord(self, request_iterator, context):  # type: ignore[no-untyped-def]  # noqa: N802
            size = 0
            async for request in request_iterator:
                size += len(request.chunk)
            return pb.Record(id="floor", size=size)

    async def serve() -> None:
        server = aio.server(options=server_options(config))
        pb_grpc.add_RecordServiceServicer_to_server(Servicer(), server)
        tls = config.tls
        creds = grpc.ssl_server_credentials(
            [(Path(tls.key).read_bytes(), Path(tls.cert).read_bytes())],
            root_certificates=Path(tls.client_ca).read_bytes(),
            require_client_auth=True,
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()

    def orphaned() -> None:
        sys.stdin.read()  # returns at EOF: the bench's end of the pipe closed
        os._exit(0)

    threading.Thread(target=orphaned, daemon=True).start()
    asyncio.run(serve())


# -- one client: latencies -------------------------------------------------------------

KINDS = ("medvault", "raw", "floor")


@dataclass
class Payload:
    size: int
    data: bytes
    chunks: list[bytes]
    digest: bytes

    @classmethod
    def random(cls, size: int, chunk: int) -> Payload:
        data = os.urandom(size)  # incompressible, so nobody gains from compression
        chunks = [data[i : i + chunk] for i in range(0, size, chunk)]
        return cls(size, data, chunks, hashlib.sha256(data).digest())


@dataclass
class Clients:
    """One client of each kind (one connection each)."""

    medvault: Medvault
    raw: Raw
    floor: Floor

    def close(self) -> None:
        self.medvault.close()
        self.raw.close()
        self.floor.close()


@dataclass
class LatencyRow:
    """p50s at one client, one size, one direction; CPU in ms per operation."""

    size: str
    op: str
    n: int
    medvault_p50_ms: float
    raw_p50_ms: float
    floor_p50_ms: float
    medvault_p90_ms: float
    ratio: float  # medvault / (raw + floor)
    medvault_per_s: float  # 1 client: operations / summed wall time
    raw_per_s: float
    service_cpu_ms: float
    floor_cpu_ms: float


def _ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))] * 1e3


class Pids:
    def __init__(self, service: int, floor: int) -> None:
        self.service, self.floor = service, floor

    def cpu(self) -> tuple[float, float]:
        return tree_cpu(self.service), tree_cpu(self.floor)


def measure_latency(
    name: str, payload: Payload, ops: int, clients: Clients, pids: Pids
) -> tuple[list[LatencyRow], list[str], list[str]]:
    """``ops`` puts, then ``ops`` gets, of each kind interleaved; one warm-up each.

    Returns the rows and the medvault ids and raw keys written (read by the gets)."""
    size = payload.size
    clients.medvault.put(payload.chunks, payload.digest)  # warm-up: code paths, sessions
    clients.raw.put(payload.chunks, payload.digest)
    clients.floor.put(payload.chunks, payload.digest)
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    ids: list[str] = []
    keys: list[str] = []
    cpu0 = pids.cpu()
    for _ in range(ops):
        elapsed, record_id = _timed(lambda: clients.medvault.put(payload.chunks, payload.digest))
        times["medvault"].append(elapsed)
        ids.append(str(record_id))
        elapsed, key = _timed(lambda: clients.raw.put(payload.chunks, payload.digest))
        times["raw"].append(elapsed)
        keys.append(str(key))
        times["floor"].append(_timed(lambda: clients.floor.put(payload.chunks, payload.digest))[0])
    cpu1 = pids.cpu()
    rows = [_latency_row(name, "put", ops, times, cpu0, cpu1)]
    _check(clients.medvault.get(ids[0]), size, "GetRecord")  # warm-up
    _check(clients.raw.get(keys[0]), size, "raw GET")
    _check(clients.floor.get(size), size, "floor GetRecord")
    times = {k: [] for k in KINDS}
    cpu0 = pids.cpu()
    for record_id, key in zip(ids, keys, strict=True):
        elapsed, got = _timed(lambda: clients.medvault.get(record_id))  # noqa: B023  (called at once)
        _check(got, size, "GetRecord")
        times["medvault"].append(elapsed)
        elapsed, got = _timed(lambda: clients.raw.get(key))  # noqa: B023
        _check(got, size, "raw GET")
        times["raw"].append(elapsed)
        elapsed, got = _timed(lambda: clients.floor.get(size))
        _check(got, size, "floor GetRecord")
        times["floor"].append(elapsed)
    cpu1 = pids.cpu()
    rows.append(_latency_row(name, "get", ops, times, cpu0, cpu1))
    print(f"  latency {name}: {ops} ops of each kind and direction done", flush=True)
    return rows, ids, keys


def _latency_row(
    name: str, op: str, ops: int, times: dict[str, list[float]],
    cpu0: tuple[float, float], cpu1: tuple[float, float],
) -> LatencyRow:  # fmt: skip
    mv, raw, floor = _ms(times["medvault"]), _ms(times["raw"]), _ms(times["floor"])
    return LatencyRow(
        size=name, op=op, n=ops, medvault_p50_ms=mv, raw_p50_ms=raw, floor_p50_ms=floor,
        medvault_p90_ms=_p90(times["medvault"]), ratio=mv / (raw + floor),
        medvault_per_s=ops / sum(times["medvault"]), raw_per_s=ops / sum(times["raw"]),
        service_cpu_ms=(cpu1[0] - cpu0[0]) * 1e3 / ops,
        floor_cpu_ms=(cpu1[1] - cpu0[1]) * 1e3 / ops,
    )  # fmt: skip


def _timed(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _check(got: int, size: int, what: str) -> None:
    if got != size:
        raise SystemExit(f"{what} returned {got} bytes, expected {size}")


# -- several clients: throughput -------------------------------------------------------


@dataclass
class ThroughputRow:
    """Operations per second at ``clients`` concurrent clients, summed over rounds."""

    size: str
    op: str
    clients: int
    seconds: float  # measured time per kind, all rounds
    medvault_ops: int
    raw_ops: int
    medvault_per_s: float
    raw_per_s: float
    ratio: float  # medvault / raw
    medvault_p50_ms: float
    raw_p50_ms: float
    service_cpu_ms: float  # per medvault operation
    client_cpu_ms: float  # the bench process's CPU per medvault operation
    raw_client_cpu_ms: float  # and per raw operation (both: all client threads)
    # The transport floor at the same concurrency; 0 in reports from before it was measured.
    floor_ops: int = 0
    floor_per_s: float = 0.0
    floor_ratio: float = 0.0  # medvault / floor
    floor_p50_ms: float = 0.0
    floor_cpu_ms: float = 0.0  # the floor server's CPU per floor operation
    floor_client_cpu_ms: float = 0.0  # the bench process's CPU per floor operation


def _phase(
    workers: list[Callable[[int], object]], seconds: float
) -> tuple[int, float, list[float]]:
    """Run each worker in its own thread for ``seconds``; ops, elapsed, latencies."""
    start_gate = threading.Barrier(len(workers) + 1)
    latencies: list[list[float]] = [[] for _ in workers]
    failures: list[Exception] = []
    deadline = [0.0]

    def loop(n: int) -> None:
        start_gate.wait()
        i = 0
        try:
            while time.perf_counter() < deadline[0]:
                latencies[n].append(_timed(lambda: workers[n](i))[0])  # noqa: B023
                i += 1
        except Exception as e:  # noqa: BLE001  (reported below, once every thread stopped)
            failures.append(e)

    threads = [threading.Thread(target=loop, args=(n,), daemon=True) for n in range(len(workers))]
    for thread in threads:
        thread.start()
    start = time.perf_counter()
    deadline[0] = start + seconds
    start_gate.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if failures:
        raise SystemExit(f"a client failed: {failures[0]!r}")
    flat = [x for lat in latencies for x in lat]
    return len(flat), elapsed, flat


@dataclass
class _Tally:
    """One kind's timed phases in one cell (size, op, clients), summed over rounds."""

    ops: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    server_cpu: float = 0.0  # CPU seconds of the server's process tree (raw: not measured)
    client_cpu: float = 0.0  # CPU seconds of this process (all client threads)

    def run(self, workers: list[Callable[[int], object]], seconds: float, server: int) -> None:
        """One phase; ``server`` is the pid whose tree's CPU to charge (0: none)."""
        before, own = tree_cpu(server) if server else 0.0, time.process_time()
        n, elapsed, latencies = _phase(workers, seconds)
        self.client_cpu += time.process_time() - own
        if server:
            self.server_cpu += tree_cpu(server) - before
        self.ops += n
        self.seconds += elapsed
        self.latencies += latencies

    @property
    def rate(self) -> float:
        return self.ops / self.seconds

    def per_op_ms(self, cpu: float) -> float:
        return cpu * 1e3 / max(self.ops, 1)


def measure_throughput(
    name: str, payload: Payload, levels: list[int], seconds: float, rounds: int,
    pool: list[Clients], ids: list[str], keys: list[str], pids: Pids,
) -> list[ThroughputRow]:  # fmt: skip
    """Per level and direction, ``rounds`` x (medvault, raw, floor phase), ``seconds`` each.

    The order rotates each round (medvault, raw, floor; raw, floor, medvault; ...), so no
    kind always runs first, on a service or cache still cold or warm from the last cell."""
    rows = []
    new_ids: list[str] = []
    new_keys: list[str] = []
    servers = {"medvault": pids.service, "raw": 0, "floor": pids.floor}
    for op in ("put", "get"):
        for level in levels:
            tally = {kind: _Tally() for kind in KINDS}
            for r in range(rounds):
                for kind in KINDS[r % len(KINDS) :] + KINDS[: r % len(KINDS)]:
                    workers = [
                        _worker(op, kind, c, n, level, payload, ids + new_ids, keys + new_keys,
                                new_ids, new_keys)
                        for n, c in enumerate(pool[:level])
                    ]  # fmt: skip
                    tally[kind].run(workers, seconds, servers[kind])
            row = _throughput_row(name, op, level, tally)
            rows.append(row)
            print(f"  throughput {name} {op} x{level}: medvault {row.medvault_per_s:.1f}/s, "
                  f"raw {row.raw_per_s:.1f}/s, floor {row.floor_per_s:.1f}/s",
                  flush=True)  # fmt: skip
    return rows


def _throughput_row(name: str, op: str, level: int, tally: dict[str, _Tally]) -> ThroughputRow:
    mv, raw, floor = tally["medvault"], tally["raw"], tally["floor"]
    return ThroughputRow(
        size=name, op=op, clients=level, seconds=mv.seconds,
        medvault_ops=mv.ops, raw_ops=raw.ops, medvault_per_s=mv.rate, raw_per_s=raw.rate,
        ratio=mv.rate / raw.rate,
        medvault_p50_ms=_ms(mv.latencies), raw_p50_ms=_ms(raw.latencies),
        service_cpu_ms=mv.per_op_ms(mv.server_cpu),
        client_cpu_ms=mv.per_op_ms(mv.client_cpu),
        raw_client_cpu_ms=raw.per_op_ms(raw.client_cpu),
        floor_ops=floor.ops, floor_per_s=floor.rate, floor_ratio=mv.rate / floor.rate,
        floor_p50_ms=_ms(floor.latencies), floor_cpu_ms=floor.per_op_ms(floor.server_cpu),
        floor_client_cpu_ms=floor.per_op_ms(floor.client_cpu),
    )  # fmt: skip


def _worker(
    op: str, kind: str, clients: Clients, n: int, level: int, payload: Payload,
    ids: list[str], keys: list[str], new_ids: list[str], new_keys: list[str],
) -> Callable[[int], object]:  # fmt: skip
    if kind == "floor":
        return _floor_worker(op, clients.floor, payload)
    client: Medvault | Raw = clients.medvault if kind == "medvault" else clients.raw
    if op == "put":
        written = new_ids if kind == "medvault" else new_keys

        def put(i: int) -> object:
            written.append(client.put(payload.chunks, payload.digest))  # list.append: atomic
            return None

        return put
    names = ids if kind == "medvault" else keys

    def get(i: int) -> object:
        # Client n reads every level-th object from its own offset: spread over objects.
        key = names[(n + i * level) % len(names)]
        _check(client.get(key), payload.size, f"{kind} get")
        return None

    return get


def _floor_worker(op: str, floor: Floor, payload: Payload) -> Callable[[int], object]:
    """The floor keeps nothing: a put is discarded, a get streams ``payload.size`` bytes."""
    if op == "put":

        def put(i: int) -> object:
            floor.put(payload.chunks, payload.digest)
            return None

        return put

    def get(i: int) -> object:
        _check(floor.get(payload.size), payload.size, "floor get")
        return None

    return get


# -- reporting -------------------------------------------------------------------------


@dataclass
class Verdict:
    target: str
    passed: bool
    detail: str


def verdicts(latency: list[LatencyRow], throughput: list[ThroughputRow]) -> list[Verdict]:
    out = []
    worst = max(latency, key=lambda r: r.ratio, default=None)
    if worst is not None:
        missed = [f"{r.size} {r.op} {r.ratio:.2f}x" for r in latency if r.ratio > LATENCY_TARGET]
        detail = (f"worst {worst.size} {worst.op} {worst.ratio:.2f}x; over: "
                  f"{', '.join(missed) or 'none'}")  # fmt: skip
        out.append(Verdict(
            f"p50 at 1 client: medvault <= {LATENCY_TARGET} x (raw S3 + transport floor), "
            f"put and get, {', '.join(dict.fromkeys(r.size for r in latency))}",
            not missed, detail,
        ))  # fmt: skip
    for op in ("put", "get"):
        row = next((r for r in throughput if r.size == THROUGHPUT_TARGET_SIZE and r.op == op
                    and r.clients == THROUGHPUT_TARGET_CLIENTS), None)  # fmt: skip
        if row is None:
            continue
        out.append(Verdict(
            f"throughput at {row.clients} clients, {row.size} {op}: >= {THROUGHPUT_TARGET} x "
            "raw S3 at the same concurrency",
            row.ratio >= THROUGHPUT_TARGET,
            f"{row.medvault_per_s:.1f}/s vs raw {row.raw_per_s:.1f}/s = {row.ratio:.2f}x"
            + _ceiling(row),
        ))  # fmt: skip
    return out


def _ceiling(row: ThroughputRow) -> str:
    """The floor's rate beside the target's: explains a verdict, never changes it."""
    if not row.floor_per_s:
        return ""  # a report from before the floor's throughput was measured
    text = f"; transport floor {row.floor_per_s:.1f}/s (medvault {row.floor_ratio:.2f}x of it)"
    wanted = THROUGHPUT_TARGET * row.raw_per_s
    if wanted > row.floor_per_s:
        text += (f"; the target ({THROUGHPUT_TARGET} x raw = {wanted:.1f}/s) is above the "
                 "transport ceiling measured on this host (a gRPC+mTLS server that does "
                 "nothing behind the call)")  # fmt: skip
    return text


def print_report(report: dict[str, object]) -> None:
    latency = [LatencyRow(**r) for r in report["latency"]]  # type: ignore[attr-defined]
    throughput = [ThroughputRow(**r) for r in report["throughput"]]  # type: ignore[attr-defined]
    print(f"\nyardsticks - {report['when']}, {report['machine']}\n")
    header = (f"{'size':>6} {'op':<4} {'n':>4} {'raw p50':>9} {'floor p50':>10} "
              f"{'mv p50':>9} {'mv p90':>9} {'mv/(raw+floor)':>15} {'svc CPU/op':>11} "
              f"{'floor CPU/op':>13}")  # fmt: skip
    print("1 client, interleaved (ms):")
    print(header)
    print("-" * len(header))
    for r in latency:
        print(f"{r.size:>6} {r.op:<4} {r.n:>4} {r.raw_p50_ms:>9.2f} {r.floor_p50_ms:>10.2f} "
              f"{r.medvault_p50_ms:>9.2f} {r.medvault_p90_ms:>9.2f} {r.ratio:>14.2f}x "
              f"{r.service_cpu_ms:>11.2f} {r.floor_cpu_ms:>13.2f}")  # fmt: skip
    if throughput:
        _print_throughput(throughput)
    print()
    for v in report["verdicts"]:  # type: ignore[attr-defined]
        print(f"{'PASS' if v['passed'] else 'MISS'} {v['target']}: {v['detail']}")
    if not any(v["target"].startswith("throughput") for v in report["verdicts"]):  # type: ignore[attr-defined]
        print(f"(throughput target not judged: {THROUGHPUT_TARGET_SIZE} at "
              f"{THROUGHPUT_TARGET_CLIENTS} clients was not measured in this run)")  # fmt: skip
    print(f"load average before / after: {report['load_before']} / {report['load_after']}")


def _print_throughput(throughput: list[ThroughputRow]) -> None:
    print("\nthroughput, timed phases of medvault / raw / floor, order rotated each round "
          "(operations per second; CPU in ms per operation):")  # fmt: skip
    header = (f"{'size':>6} {'op':<4} {'clients':>7} {'raw/s':>8} {'floor/s':>8} {'mv/s':>8} "
              f"{'mv/raw':>7} {'mv/floor':>8} {'raw p50':>9} {'mv p50':>9} {'svc CPU':>8} "
              f"{'floor CPU':>9} {'client CPU mv, raw, floor':>26}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for t in throughput:
        # A report from before the floor's throughput was measured has zeros there.
        floor = (f"{t.floor_per_s:>8.1f}", f"{t.floor_ratio:>7.2f}x", f"{t.floor_cpu_ms:>9.2f}",
                 f"{t.floor_client_cpu_ms:>5.2f}") if t.floor_per_s else (
                 f"{'-':>8}", f"{'-':>8}", f"{'-':>9}", f"{'-':>5}")  # fmt: skip
        print(f"{t.size:>6} {t.op:<4} {t.clients:>7} {t.raw_per_s:>8.1f} {floor[0]} "
              f"{t.medvault_per_s:>8.1f} {t.ratio:>6.2f}x {floor[1]} {t.raw_p50_ms:>9.2f} "
              f"{t.medvault_p50_ms:>9.2f} {t.service_cpu_ms:>8.2f} {floor[2]} "
              f"{t.client_cpu_ms:>12.2f}, {t.raw_client_cpu_ms:>5.2f}, {floor[3]}")  # fmt: skip


# -- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: ops {QUICK_OPS}, 512KiB throughput at 1 and 4 clients "
                   "for 0.5 s, one round")  # fmt: skip
    for name, dest in OPS_FLAGS.items():
        flag = "--" + dest.replace("_", "-")
        p.add_argument(flag, dest=dest, type=int,
                       help=f"1-client ops per kind and direction for {name} "
                       f"(default {FULL_OPS[name]})")  # fmt: skip
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated subset of sizes")
    p.add_argument("--throughput-sizes", default=None,
                   help="sizes measured at several clients (default 4KiB,512KiB; "
                   "--quick: 512KiB; empty: none)")  # fmt: skip
    p.add_argument("--clients", default=None, help="client counts (default 1,4,16; --quick 1,4)")
    p.add_argument("--seconds", type=float, default=None,
                   help="seconds per throughput phase (default 5; --quick 0.5)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of medvault, raw and floor phases per cell "
                   "(default 2; --quick 1)")  # fmt: skip
    p.add_argument("--home", type=Path, help="stack home to use (default: a fresh temp dir)")
    p.add_argument("--keep", action="store_true", help="leave the stack running and the home")
    p.add_argument("--json", type=Path, help="also write the report here")
    return p.parse_args(argv)


def _sizes(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        raise SystemExit(f"unknown sizes {unknown}; known: {', '.join(SIZES)}")
    return names


def _levels(ns: argparse.Namespace) -> list[int]:
    return [int(x) for x in (ns.clients or ("1,4" if ns.quick else "1,4,16")).split(",") if x]


def _share_for(stack: LocalStack, clients: int) -> None:
    """Let one principal hold ``clients`` calls at once; restarts the service if needed.

    Every bench client writes as the same records clerk and reads as the same physician;
    the service's per-principal share (a quarter of ``server.workers``: 8) would refuse
    the 9th concurrent call of one person. The config is edited after ``up`` (an edited
    config is no longer moved off taken ports), then the service restarted. A home whose
    config already sets the share is left alone.
    """
    config = stack.layout.config
    text = config.read_text()
    if "max_calls_per_principal" in text or clients <= 8:
        return
    layout = stack.layout
    pid = int(layout.service_pid.read_text().strip())
    ServiceProcess(layout.config, layout.service_pid, layout.service_log).stop()
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    config.write_text(
        text.replace("[server]\n", f"[server]\nmax_calls_per_principal = {clients}\n", 1)
    )
    stack.start_service()


def _discard(stack: LocalStack) -> None:
    """Stop a throwaway stack: SIGTERM, then SIGKILL after 3 s (service) or 1 s (weed).

    weed takes 15 s or more to exit on SIGTERM; its data is deleted right after anyway.
    """
    layout = stack.layout
    ServiceProcess(layout.config, layout.service_pid, layout.service_log).stop(timeout=3.0)
    config = service_config.load(layout.config)
    SeaweedServer(
        layout.s3_dir, int(config.s3.endpoint.rsplit(":", 1)[1]),
        layout.s3_access_key_file.read_text().strip(),
        layout.s3_secret_key_file.read_text().strip(), log_file=layout.weed_log,
    ).stop(timeout=1.0)  # fmt: skip
    stack.down()  # nothing left to stop: releases whatever the stack still tracks


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(ns: argparse.Namespace, stack: LocalStack, server: FloorServer) -> dict[str, object]:
    ops = dict(QUICK_OPS if ns.quick else FULL_OPS)
    for name, dest in OPS_FLAGS.items():
        if getattr(ns, dest) is not None:
            ops[name] = max(1, getattr(ns, dest))
    names = _sizes(ns.sizes)
    conc = _sizes(ns.throughput_sizes if ns.throughput_sizes is not None
                  else "512KiB" if ns.quick else "4KiB,512KiB")  # fmt: skip
    levels = _levels(ns)
    seconds = ns.seconds if ns.seconds is not None else 0.5 if ns.quick else 5.0
    rounds = ns.rounds if ns.rounds is not None else 1 if ns.quick else 2
    chunk = service_config.load(stack.layout.config).server.chunk_size
    load_before = _load()
    pids = Pids(int(stack.layout.service_pid.read_text().strip()), server.pid)
    print(f"service pid {pids.service}, endpoint {stack.endpoint()}; floor server pid "
          f"{pids.floor}, port {server.port}; load {load_before}", flush=True)  # fmt: skip
    first = Medvault(stack)  # grants the physician access
    pool = [Clients(first, Raw(stack), Floor(stack, server))]
    pool += [Clients(Medvault(stack, grant=False), Raw(stack), Floor(stack, server))
             for _ in range(max(levels, default=1) - 1)]  # fmt: skip
    latency: list[LatencyRow] = []
    throughput: list[ThroughputRow] = []
    try:
        for name in dict.fromkeys(names + conc):
            payload = Payload.random(SIZES[name], chunk)
            ids: list[str] = []
            keys: list[str] = []
            if name in names:
                rows, ids, keys = measure_latency(name, payload, ops[name], pool[0], pids)
                latency += rows
            if name in conc and levels:
                throughput += measure_throughput(
                    name, payload, levels, seconds, rounds, pool, ids, keys, pids
                )
    finally:
        for clients in pool:
            clients.close()
    report: dict[str, object] = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
        f"grpcio {grpc.__version__}",
        "load_before": load_before,
        "load_after": _load(),
        "ops": ops,
        "latency": [asdict(r) for r in latency],
        "throughput": [asdict(t) for t in throughput],
        "verdicts": [asdict(v) for v in verdicts(latency, throughput)],
    }
    bad = [k for k, v in _ratios(report) if not (math.isfinite(v) and v > 0)]
    if bad:
        print(f"warning: ratios that are not positive finite numbers: {bad}")
    return report


def _ratios(report: dict[str, object]) -> list[tuple[str, float]]:
    """Every ratio in the report, named (the CI test checks them)."""
    out = [(f"latency {r['size']} {r['op']}", r["ratio"]) for r in report["latency"]]  # type: ignore[attr-defined]
    out += [(f"throughput {t['size']} {t['op']} x{t['clients']}", t["ratio"])
            for t in report["throughput"]]  # type: ignore[attr-defined]  # fmt: skip
    out += [(f"throughput {t['size']} {t['op']} x{t['clients']} mv/floor", t["floor_ratio"])
            for t in report["throughput"] if "floor_ratio" in t]  # type: ignore[attr-defined]  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--floor-server"]:
        floor_server(Path(argv[1]))
        return 0
    allocator.tune()  # the clients' side as the servers' (module docstring)
    ns = parse_args(argv)
    home = ns.home or Path(tempfile.mkdtemp(prefix="medvault-bench-"))
    stack = LocalStack(home, report=lambda line: print(f"  [stack] {line}", flush=True))
    server: FloorServer | None = None
    try:
        stack.prepare()
        server = FloorServer(stack)  # starts while the stack comes up
        stack.up()
        _share_for(stack, max(_levels(ns), default=1))
        report = run(ns, stack, server)
    finally:
        if server is not None:
            server.close()
        if not ns.keep:
            if ns.home is None:
                _discard(stack)
                shutil.rmtree(home, ignore_errors=True)
            else:
                stack.down()
    print_report(report)
    if ns.json:
        ns.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
