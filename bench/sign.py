"""SignRecord against its targets: rate at 8 clients, p50 against GetRecord's, token speed.

Run from the project root::

    .venv/bin/python bench/sign.py                       # 10 s per phase
    .venv/bin/python bench/sign.py --seconds 5 --profile /tmp/sign-prof

It prepares its own local stack (``LocalStack``, as ``medvault stack up``) in a
temporary MEDVAULT_HOME, so the sample physician ``dr-lan`` has an EC P-256 signer key
and dev-CA certificate on the stack's SoftHSM2 token. The clerk writes one 4 KiB record
and grants dr-lan. Then, in one run and against the same record, as dr-lan:

1. GetRecord, 1 client, then ``--clients`` clients (p50 and rate);
2. SignRecord (CAdES detached), 1 client, then ``--clients`` clients (p50 and rate;
   each call: mutual TLS, authorization, grant check, read event, token signature,
   sealed row insert with the signature's event);
3. the service is stopped, and this process signs SHA-256 digests with ``CKM_ECDSA``
   on the same key with python-pkcs11 in a tight loop (the token's speed).

Each phase also reports the service's CPU time per call (``/proc``), the figure that
a busy shared machine disturbs least. ``--profile DIR`` records the service with
``py-spy`` during the many-client SignRecord phase (``DIR/sign.svg``, ``DIR/sign.txt``
and ``DIR/sign-summary.txt``).

Targets (issue 12), printed PASS/MISS: SignRecord at ``--clients`` (8) clients
>= 300 signatures/s; its p50 <= 3 x GetRecord's p50 at the same concurrency (the 1-client
ratio is printed too). The exit status is 0 whatever the result: a benchmark informs,
it does not gate.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc  # noqa: E402
from profile_ops import summarise  # noqa: E402
from put_get import tree_cpu  # noqa: E402

from service._gen.medvault.v1 import access_pb2 as apb  # noqa: E402
from service._gen.medvault.v1 import access_pb2_grpc as apb_grpc  # noqa: E402
from service._gen.medvault.v1 import records_pb2 as pb  # noqa: E402
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc  # noqa: E402
from service._gen.medvault.v1 import signing_pb2 as spb  # noqa: E402
from service._gen.medvault.v1 import signing_pb2_grpc as spb_grpc  # noqa: E402
from service.localstack.stack import LocalStack  # noqa: E402

RATE_TARGET = 300.0  # signatures/s at 8 clients
P50_TARGET = 3.0  # SignRecord p50 / GetRecord p50
RECORD_SIZE = 4096
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
    """As the clerk: one 4 KiB record of the bench patient, and dr-lan's grant."""
    with _channel(stack, "records_clerk") as channel:
        header = pb.RecordHeader(patient=PATIENT, kind=pb.RECORD_KIND_OTHER,
                                 content_type="application/octet-stream")  # fmt: skip
        stream = iter([pb.PutRecordRequest(header=header),
                       pb.PutRecordRequest(chunk=os.urandom(RECORD_SIZE))])  # fmt: skip
        record_id = str(pb_grpc.RecordServiceStub(channel).PutRecord(stream).id)
        apb_grpc.AccessServiceStub(channel).GrantAccess(
            apb.GrantAccessRequest(patient=PATIENT, principal=SIGNER)
        )
    return record_id


def _sign_call(record_id: str) -> Callable[[grpc.Channel], Callable[[], object]]:
    request = spb.SignRecordRequest(record_id=record_id, signer=SIGNER)

    def bind(channel: grpc.Channel) -> Callable[[], object]:
        stub = spb_grpc.SigningServiceStub(channel)
        return lambda: stub.SignRecord(request, timeout=30)

    return bind


def _get_call(record_id: str) -> Callable[[grpc.Channel], Callable[[], object]]:
    request = pb.GetRecordRequest(id=record_id)

    def bind(channel: grpc.Channel) -> Callable[[], object]:
        stub = pb_grpc.RecordServiceStub(channel)
        return lambda: sum(1 for _ in stub.GetRecord(request, timeout=30))

    return bind


def _cpu(pid: str) -> float:
    """User + system CPU seconds of the service so far: the pid file's process and its
    worker processes (``--processes``), all threads."""
    return tree_cpu(int(pid))


def measure(
    stack: LocalStack,
    bind: Callable[[grpc.Channel], Callable[[], object]],
    clients: int,
    seconds: float,
    during: Callable[[], None] | None = None,
) -> tuple[float, float, float]:
    """Calls per second, p50 latency and service CPU per call (seconds) over
    ``clients`` threads."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    measuring, stop = threading.Event(), threading.Event()
    ready = threading.Barrier(clients + 1)

    def worker(i: int) -> None:
        with _channel(stack, "physician") as channel:
            call = bind(channel)
            for _ in range(3):
                call()  # warm-up: the TLS handshake and the first stub calls
            ready.wait()
            while not stop.is_set():
                start = time.perf_counter()
                call()
                if measuring.is_set():
                    latencies[i].append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    time.sleep(0.5)
    if during is not None:
        during()
    pid = stack.layout.service_pid.read_text().strip()
    measuring.set()
    start, cpu = time.perf_counter(), _cpu(pid)
    time.sleep(seconds)
    measuring.clear()
    elapsed, cpu = time.perf_counter() - start, _cpu(pid) - cpu
    stop.set()
    for t in threads:
        t.join()
    every = [x for per in latencies for x in per]
    return len(every) / elapsed, statistics.median(every), cpu / max(len(every), 1)


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


def _profiler(
    stack: LocalStack, out: Path, seconds: float, gil: bool
) -> tuple[Callable[[], None], list]:
    """A starter for py-spy on the service (flame graph and collapsed stacks); with
    ``gil``, only the thread holding the GIL is sampled (where Python's CPU goes)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    pid = stack.layout.service_pid.read_text().strip()
    runs: list[subprocess.Popen[bytes]] = []
    out.mkdir(parents=True, exist_ok=True)

    def start() -> None:
        for fmt, suffix in (("flamegraph", ".svg"), ("raw", ".txt")):
            runs.append(subprocess.Popen(
                [spy, "record", "--pid", pid, "--rate", "200", "--duration",
                 str(int(seconds)), "--format", fmt, "--output", str(out / "sign") + suffix,
                 "--nonblocking", *(["--gil"] if gil else [])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip

    return start, runs


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv: list[str] | None = None) -> int:
    """Run every phase and print the figures and the targets' verdicts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--profile", type=Path, default=None, help="py-spy output directory")
    parser.add_argument("--gil", action="store_true", help="profile the GIL holder only")
    parser.add_argument(
        "--processes", type=int, default=1,
        help="service processes (server.processes); py-spy needs 1 (it follows one pid)",
    )  # fmt: skip
    ns = parser.parse_args(argv)
    if ns.processes < 1 or (ns.processes > 1 and ns.profile is not None):
        parser.error("--processes must be >= 1, and 1 with --profile")
    home = ns.home or Path(tempfile.mkdtemp(prefix="medvault-sign-bench-"))
    stack = LocalStack(home, report=lambda line: print(f"  [stack] {line}", flush=True))
    n = ns.clients
    try:
        stack.prepare()
        # One service process unless asked: py-spy follows the pid file's process (the
        # CPU figures add up its worker processes).
        config, text = stack.layout.config, stack.layout.config.read_text()
        if "\nprocesses = " not in text:
            setting = f"[server]\nprocesses = {ns.processes}\n"
            config.write_text(text.replace("[server]\n", setting, 1))
        stack.up()
        record_id = write_record(stack)
        get1 = measure(stack, _get_call(record_id), 1, ns.seconds)
        getn = measure(stack, _get_call(record_id), n, ns.seconds)
        sign1 = measure(stack, _sign_call(record_id), 1, ns.seconds)
        start, runs = (
            (None, []) if ns.profile is None else _profiler(stack, ns.profile, ns.seconds, ns.gil)
        )
        signn = measure(stack, _sign_call(record_id), n, ns.seconds, during=start)
        for run in runs:
            run.wait(timeout=ns.seconds + 60)
    finally:
        stack.down()
    try:
        bare = pkcs11_rate(stack, ns.seconds)
    finally:
        if ns.home is None:  # a home of its own: its token and data go with the run
            shutil.rmtree(home, ignore_errors=True)
    for what, (rate, p50, cpu) in (
        ("GetRecord  4 KiB, 1 client: ", get1), (f"GetRecord  4 KiB, {n} clients:", getn),
        ("SignRecord 4 KiB, 1 client: ", sign1), (f"SignRecord 4 KiB, {n} clients:", signn),
    ):  # fmt: skip
        print(f"{what} {rate:8.1f}/s  p50 {p50 * 1e3:6.2f} ms  service CPU {cpu * 1e3:5.2f} ms")
    print(f"bare python-pkcs11 CKM_ECDSA loop (1 thread): {bare:8.1f}/s")
    print(f"SignRecord / bare token loop: {signn[0] / bare:.3f}x ({n} clients), "
          f"{sign1[0] / bare:.3f}x (1 client)")  # fmt: skip
    ratio1, ration = sign1[1] / get1[1], signn[1] / getn[1]
    print(f"p50 SignRecord / GetRecord: {ration:.2f}x ({n} clients), {ratio1:.2f}x (1 client)")
    print(f"{_verdict(signn[0] >= RATE_TARGET)}  SignRecord at {n} clients "
          f">= {RATE_TARGET:.0f}/s: {signn[0]:.1f}/s")  # fmt: skip
    print(f"{_verdict(ration <= P50_TARGET)}  SignRecord p50 <= {P50_TARGET:.0f} x GetRecord p50 "
          f"({n} clients): {ration:.2f}x")  # fmt: skip
    if ns.profile is not None:
        summary = summarise(ns.profile / "sign.txt")
        (ns.profile / "sign-summary.txt").write_text(summary)
        print(f"profile: {ns.profile}/sign.svg, {ns.profile}/sign-summary.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
