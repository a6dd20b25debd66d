"""GetRecord throughput with the audit trail on vs off (4 KiB records, 16 concurrent clients).

Run from the project root::

    .venv/bin/python bench/audit_overhead.py            # full run (about 2-3 minutes)
    .venv/bin/python bench/audit_overhead.py --quick    # smoke run (under a minute)
    .venv/bin/python bench/audit_overhead.py --pairs 5 --seconds 20 --json out.json
    .venv/bin/python bench/audit_overhead.py --home /tmp/mva --keep   # leave the stack up

It prepares its own local stack (``LocalStack``, what ``medvault stack up`` uses) in a
temporary MEDVAULT_HOME and starts SeaweedFS once. Each *phase* rewrites the stack's
``config.toml`` with ``[audit] enabled = true`` or ``false`` (the BENCHMARK-ONLY switch of
``service.config.AuditConfig``), starts a fresh service process, measures, and stops it:
only one service runs at a time, and every phase starts from the same state (same
SeaweedFS, same SQLite database, same records, same grant).

The path is the realistic one: the records_clerk sample person (``clerk-thu``) writes
the 4 KiB records and grants the physician sample person (``dr-lan``) care-team access
to the benchmark patient with ``AccessService.GrantAccess``; then 16 client threads,
each with its own gRPC channel (and TCP/TLS connection), read them as the physician
with GetRecord, round robin over the records, for a fixed time per phase. Each read
therefore passes authentication, authorization, the grant check and (audit on) the
group-committed, synchronous=FULL audit append before its content is sent.

Phases run in ABBA order (on, off, off, on, on, off, ...) so that drift on the noisy
shared machine falls on both modes alike. Reported per phase: requests/s, p50/p99
latency, service CPU per request, audit events written per second (counted in the
database: the growth of ``audit_events`` during the measured window). Then the ratio of
the aggregate throughputs audit-on / audit-off against issue 12's target (>= 0.9x; the
audit issue's own bar, 0.8x, is printed beside it). The exit
status is 0 whatever the result: a benchmark informs, it does not gate.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service import config as service_config  # noqa: E402  (after the path fix)
from service._gen.medvault.v1 import access_pb2 as apb  # noqa: E402
from service._gen.medvault.v1 import access_pb2_grpc as apb_grpc  # noqa: E402
from service._gen.medvault.v1 import records_pb2 as pb  # noqa: E402
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc  # noqa: E402
from service.localstack.layout import pick_port  # noqa: E402
from service.localstack.service_proc import ServiceProcess, TlsClient  # noqa: E402
from service.localstack.stack import LocalStack  # noqa: E402

RECORD_SIZE = 4 << 10
TARGET = 0.9  # issue 12: reads with audit on / off at 16 clients
EARLIER_TARGET = 0.8  # the audit issue's bar, which issue 12 raised
PATIENT = pb.PatientId(id="BENCH-AUDIT-0001", assigning_authority="BENCH")
WRITER, READER = "records_clerk", "physician"  # sample people: clerk-thu, dr-lan
READER_CN = "dr-lan"


# -- clients ---------------------------------------------------------------------------


def _channel(stack: LocalStack, who: str) -> grpc.Channel:
    """A channel of its own (own subchannel pool, so its own TCP + TLS connection)."""
    tls: TlsClient = stack.tls_client(who)
    creds = grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(),
        private_key=tls.key.read_bytes(),
        certificate_chain=tls.cert.read_bytes(),
    )
    options = [("grpc.use_local_subchannel_pool", 1)]
    return grpc.secure_channel(stack.endpoint(), creds, options=options)


def write_records(stack: LocalStack, count: int) -> list[str]:
    """As the clerk: ``count`` random 4 KiB records for the patient, and dr-lan's grant."""
    with _channel(stack, WRITER) as channel:
        records = pb_grpc.RecordServiceStub(channel)
        ids = []
        for i in range(count):
            data = os.urandom(RECORD_SIZE)  # incompressible
            header = pb.RecordHeader(
                patient=PATIENT, kind=pb.RECORD_KIND_OTHER,
                content_type="application/octet-stream", title=f"audit bench {i}",
                expected_sha256=hashlib.sha256(data).digest(),
            )  # fmt: skip
            stream = iter([pb.PutRecordRequest(header=header), pb.PutRecordRequest(chunk=data)])
            ids.append(str(records.PutRecord(stream).id))
        access = apb_grpc.AccessServiceStub(channel)
        access.GrantAccess(apb.GrantAccessRequest(patient=PATIENT, principal=READER_CN))
    return ids


def _get(stub: pb_grpc.RecordServiceStub, record_id: str) -> int:
    total = 0
    for response in stub.GetRecord(pb.GetRecordRequest(id=record_id)):
        if response.WhichOneof("message") == "chunk":
            total += len(response.chunk)
    return total


# -- one phase -------------------------------------------------------------------------


@dataclass
class Phase:
    """What one phase measured."""

    audit: bool
    seconds: float = 0.0
    requests: int = 0
    errors: int = 0
    events: int = 0  # audit_events rows added during the measured window
    service_cpu: float = 0.0  # seconds of CPU the service process used in the window
    client_cpu: float = 0.0  # seconds of CPU this (client) process used in the window
    s3_cpu: float = 0.0  # seconds of CPU SeaweedFS used in the window
    latencies: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its waited-for children, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _audit_rows(db: Path) -> int:
    """Rows in audit_events, read straight from the SQLite file (read-only)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return int(conn.execute("SELECT count(*) FROM audit_events").fetchone()[0])


def configure(stack: LocalStack, audit: bool) -> None:
    """Rewrite config.toml: the [audit] switch, and a listen port that is free now."""
    path = stack.layout.config
    text = path.read_text()
    text = re.sub(r"\n\[audit\]\n(?:[^\[\n][^\n]*\n|\n)*", "\n", text).rstrip("\n") + "\n"
    listen = service_config.load(path).server.listen
    host, _, port = listen.rpartition(":")
    free = pick_port(int(port), exclude=set())  # the last phase's port may linger
    # All clients are one principal: lift its share of concurrent calls (service.limits)
    # so the benchmark measures the audit trail, not the fairness limit.
    # One service process: the CPU figures are read from the pid file's process.
    text = re.sub(r"\n(max_calls_per_principal|processes) = \d+", "", text)
    text = text.replace(
        f'listen = "{listen}"',
        f'listen = "{host}:{free}"\nmax_calls_per_principal = 256\nprocesses = 1',
    )
    text += f"\n[audit]\nenabled = {'true' if audit else 'false'}\n"
    path.write_text(text)
    assert service_config.load(path).audit.enabled is audit


def stop_service(stack: LocalStack, timeout: float = 60.0) -> None:
    """Stop the stack's service (found through its pid file), leaving SeaweedFS up.

    ``ServiceProcess.stop`` may return while the process is still exiting (its liveness
    probe reads ``/proc/PID/cmdline``, which is empty once an exiting process has let
    go of its memory), and ``LocalStack.start_service`` would then report it "already
    running" and start nothing; so wait until the process is really gone.
    """
    layout = stack.layout
    try:
        pid = int(layout.service_pid.read_text().strip())
    except (OSError, ValueError):
        pid = None
    ServiceProcess(layout.config, layout.service_pid, layout.service_log).stop()
    deadline = time.monotonic() + timeout
    while pid is not None and _exists(pid):
        if time.monotonic() > deadline:
            raise SystemExit(f"the service (pid {pid}) did not exit within {timeout:.0f} s")
        time.sleep(0.05)


def _exists(pid: int) -> bool:
    """Whether ``pid`` still exists (reaping it if it is our exited child)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child (or already reaped): ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def run_phase(
    stack: LocalStack, audit: bool, ids: list[str], clients: int, seconds: float, warmup: int
) -> Phase:
    """Start a service with the audit switch set, read for ``seconds``, stop it."""
    stop_service(stack)  # a service already running would keep its old switch
    configure(stack, audit)
    stack.start_service()
    pid = int(stack.layout.service_pid.read_text())  # missing: no new service started
    weed = stack.start_seaweed().pid  # already running: just its handle
    phase = Phase(audit)
    channels = [_channel(stack, READER) for _ in range(clients)]
    stubs = [pb_grpc.RecordServiceStub(c) for c in channels]
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop = threading.Event()

    def client(n: int) -> None:
        stub = stubs[n]
        mine: list[float] = []
        errors = 0
        i = n * 7
        for _ in range(warmup):  # connection, TLS, code paths; not measured
            _get(stub, ids[i % len(ids)])
            i += 1
        start.wait()
        while not stop.is_set():
            record_id = ids[i % len(ids)]
            i += 1
            t0 = time.perf_counter()
            try:
                got = _get(stub, record_id)
            except grpc.RpcError as e:
                errors += 1
                if errors == 1:
                    print(f"    client {n}: {e.code().name}: {e.details()}", flush=True)
                continue
            if got != RECORD_SIZE:
                errors += 1
                print(f"    client {n}: GetRecord returned {got} bytes", flush=True)
                continue
            mine.append(time.perf_counter() - t0)
        with lock:
            phase.latencies += mine
            phase.errors += errors

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    try:
        start.wait(timeout=120)
        rows0, cpu0 = _audit_rows(stack.layout.database), _cpu_seconds(pid)
        own0, weed0 = time.process_time(), _cpu_seconds(weed) if weed else 0.0
        t0 = time.perf_counter()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        phase.seconds = time.perf_counter() - t0
        phase.service_cpu = _cpu_seconds(pid) - cpu0
        phase.client_cpu = time.process_time() - own0
        phase.s3_cpu = (_cpu_seconds(weed) - weed0) if weed else 0.0
        phase.events = _audit_rows(stack.layout.database) - rows0
    finally:
        stop.set()
        for c in channels:
            c.close()
        stop_service(stack)
    phase.requests = len(phase.latencies)
    return phase


# -- reporting -------------------------------------------------------------------------


def _aggregate(phases: list[Phase], audit: bool) -> Phase:
    out = Phase(audit)
    for p in phases:
        if p.audit is audit:
            out.seconds += p.seconds
            out.requests += p.requests
            out.errors += p.errors
            out.events += p.events
            out.service_cpu += p.service_cpu
            out.client_cpu += p.client_cpu
            out.s3_cpu += p.s3_cpu
            out.latencies += p.latencies
    return out


def _line(label: str, p: Phase) -> str:
    per = 1e3 / p.requests if p.requests else 0.0
    ev = p.events / p.seconds if p.seconds else 0.0
    return (f"{label:<6} {'on' if p.audit else 'off':<5} {p.seconds:>5.1f} {p.requests:>6}"
            f" {p.errors:>3} {p.rps:>7.1f} {p.pct(0.5) * 1e3:>7.1f} {p.pct(0.99) * 1e3:>7.1f}"
            f" {p.service_cpu * per:>6.2f} {p.client_cpu * per:>6.2f} {p.s3_cpu * per:>6.2f}"
            f" {ev:>8.1f}")  # fmt: skip


def report(phases: list[Phase], ns: argparse.Namespace) -> dict[str, object]:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\nGetRecord 4 KiB, {ns.clients} clients, audit on vs off - {when}, "
          f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}\n")  # fmt: skip
    header = (f"{'phase':<6} {'audit':<5} {'s':>5} {'reqs':>6} {'err':>3} {'req/s':>7}"
              f" {'p50 ms':>7} {'p99 ms':>7} {'svc':>6} {'client':>6} {'s3':>6}"
              f" {'events/s':>8}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for n, p in enumerate(phases, 1):
        print(_line(f"{n}", p))
    on, off = _aggregate(phases, True), _aggregate(phases, False)
    print("-" * len(header))
    print(_line("all", on))
    print(_line("all", off))
    ratio = on.rps / off.rps if off.rps else 0.0
    pairs = [a.rps / b.rps for a, b in zip(phases[0::2], phases[1::2], strict=False)
             if b.rps]  # fmt: skip
    pair_ratios = [r if a.audit else 1 / r for r, a in zip(pairs, phases[0::2], strict=False)]
    verdict = "PASS" if ratio >= TARGET else "MISS"
    earlier = "PASS" if ratio >= EARLIER_TARGET else "MISS"
    print(
        f"\nthroughput audit-on / audit-off: {ratio:.2f}x  (per adjacent pair: "
        f"{', '.join(f'{r:.2f}' for r in pair_ratios)})  target >= {TARGET}x (issue 12): "
        f"{verdict}; >= {EARLIER_TARGET}x (the audit issue's): {earlier}"
    )
    print(
        f"p50 on/off: {on.pct(0.5) * 1e3:.2f}/{off.pct(0.5) * 1e3:.2f} ms, "
        f"p99 on/off: {on.pct(0.99) * 1e3:.2f}/{off.pct(0.99) * 1e3:.2f} ms"
    )
    cpu_on = on.service_cpu / on.requests if on.requests else 0.0
    cpu_off = off.service_cpu / off.requests if off.requests else 0.0
    cpu_ratio = cpu_off / cpu_on if cpu_on else 0.0
    print(
        f"service CPU per read on/off: {cpu_on * 1e3:.2f}/{cpu_off * 1e3:.2f} ms "
        f"({(cpu_on - cpu_off) * 1e3:+.2f} ms); off/on = {cpu_ratio:.2f}x, the throughput "
        "ratio to expect while the service is CPU (GIL) bound on a quiet machine"
    )
    print(
        f"audit events written: {on.events} in {on.seconds:.1f} s of audit-on phases "
        f"({on.events / on.seconds if on.seconds else 0:.1f}/s) for {on.requests} reads; "
        f"{off.events} during audit-off phases"
    )
    print(
        "svc/client/s3 = CPU ms per request of the service process (all threads), this "
        "client process and SeaweedFS;\nevents/s counted in the database (audit_events "
        "growth during the measured window)."
    )
    return {
        "when": when, "clients": ns.clients, "seconds": ns.seconds, "ratio": ratio,
        "pair_ratios": pair_ratios, "verdict": verdict, "cpu_ratio": cpu_ratio,
        "phases": [{**{k: v for k, v in asdict(p).items() if k != "latencies"},
                    "rps": p.rps, "p50": p.pct(0.5), "p99": p.pct(0.99)} for p in phases],
    }  # fmt: skip


# -- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 pair of 4 s phases")
    p.add_argument("--pairs", type=int, default=3, help="on/off pairs, ABBA order (default 3)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per phase")
    p.add_argument("--clients", type=int, default=16, help="concurrent client threads")
    p.add_argument("--records", type=int, default=64, help="distinct 4 KiB records read")
    p.add_argument("--warmup", type=int, default=10, help="unmeasured reads per client")
    p.add_argument("--home", type=Path, help="stack home to use (default: a fresh temp dir)")
    p.add_argument("--keep", action="store_true", help="leave SeaweedFS running and the home")
    p.add_argument("--json", type=Path, help="also write the results here")
    ns = p.parse_args(argv)
    if ns.quick:
        ns.pairs, ns.seconds, ns.warmup = 1, 4.0, 5
    return ns


def order(pairs: int) -> list[bool]:
    """ABBA: on, off, off, on, on, off, ..."""
    out: list[bool] = []
    for n in range(pairs):
        out += [True, False] if n % 2 == 0 else [False, True]
    return out


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    # The service refuses [audit] enabled = false unless it runs under a benchmark; the
    # services started below inherit this environment.
    os.environ["MEDVAULT_BENCHMARK"] = "1"
    home = ns.home or Path(tempfile.mkdtemp(prefix="medvault-audit-bench-"))
    stack = LocalStack(home, report=lambda line: print(f"  [stack] {line}", flush=True))
    try:
        stack.prepare()
        stack.start_seaweed()
        stop_service(stack)  # with --home: a running service would keep its old config
        configure(stack, True)  # records and the grant are written with auditing on
        stack.start_service()
        ids = write_records(stack, ns.records)
        stop_service(stack)
        print(f"wrote {len(ids)} records of {RECORD_SIZE} B as clerk-thu; dr-lan granted",
              flush=True)  # fmt: skip
        phases = []
        for n, audit in enumerate(order(ns.pairs), 1):
            phase = run_phase(stack, audit, ids, ns.clients, ns.seconds, ns.warmup)
            phases.append(phase)
            print(
                f"  phase {n} audit {'on ' if audit else 'off'}: {phase.rps:.1f} req/s, "
                f"{phase.errors} errors, {phase.events} events",
                flush=True,
            )
        results = report(phases, ns)
        if ns.json:
            ns.json.write_text(json.dumps(results, indent=1))
    finally:
        if ns.keep:
            print(f"stack home kept: {home}")
        else:
            stack.down()
            if ns.home is None:
                shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
