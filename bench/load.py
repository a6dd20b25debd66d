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
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from google.protobuf.timestamp_pb2 import Timestamp  # noqa: E402

from bench.load_clients import (  # noqa: E402
    AUTHORITY,
    CALL_TIMEOUT,
    MIX,
    Client,
    Settings,
    Tally,
    Tls,
    run_client,
)
from service._gen.medvault.v1 import (  # noqa: E402
    access_pb2,
    access_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
)
from service._gen.medvault.v1 import records_pb2 as pb  # noqa: E402

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
