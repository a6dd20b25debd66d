"""The SQL side of a put's commit and of a read, in process: CPU and wall per operation.

Run from the project root::

    .venv/bin/python bench/sql_paths.py                      # this checkout, both backends
    .venv/bin/python bench/sql_paths.py --compare /tmp/base .   # two checkouts, alternating
    .venv/bin/python bench/sql_paths.py --backends sqlite --ops 300 --json out.json

Three paths, each timed per operation (``time.process_time`` for CPU, ``perf_counter`` for
wall), on a fresh database per run (a new SQLite file in WAL mode as ``make_engine``
makes it, or a new PostgreSQL database on the server ``$MEDVAULT_BENCH_PG`` names, by
default the local trust-auth one, dropped at the end):

* put: ``SqlAuditLog.append_pending`` of one ``Pending`` whose change is
  ``SqlMetadataStore.insert_change(row, entries)`` (a synthetic 4 KiB record's row and
  two index entries): the transaction a PutRecord commits last.
* put_key: the same with a request id, as PutRecord with ``request_id`` (and every
  DICOM and MLLP store) runs it: ``SqlPutRequests.find`` first, then the key inserted
  (``remember_change``) in the put's change.
* read: ``SqlMetadataStore.get`` of one of those records, ``SqlGrantStore.has_access``
  (one authentic care-team grant) and one audit event ``append``: a GetRecord's SQL.
* event: one audit event ``append`` alone: the audit writer's batch under one client
  (connection checkout with its listeners, head lock, insert, head update, commit).
* batch64: 64 events in one ``append``, per batch: the writer under concurrent load
  (divide by 64 for the cost per event).

No S3, no token (the grant MACs use a software HMAC key: the same per-call cost in both
checkouts), no gRPC: what is left is SQLAlchemy, the driver and the database. The audit
writer's SQLite connections run ``synchronous=FULL``, so SQLite wall times
include an fsync per commit.

``--compare BASE AFTER`` runs this script against each checkout (``--code``: its
``storage`` is imported) in fresh processes, alternating ABBA for ``--rounds`` rounds,
and prints the medians side by side with the ratio AFTER / BASE. It informs, it does
not gate: the exit status is non-zero only when a run fails.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _code_dir(argv: list[str]) -> Path:
    """The checkout named by ``--code`` (this one by default), read before any import."""
    for i, arg in enumerate(argv):
        if arg.startswith("--code="):
            return Path(arg.split("=", 1)[1]).resolve()
        if arg == "--code" and i + 1 < len(argv):
            return Path(argv[i + 1]).resolve()
    return ROOT


CODE = _code_dir(sys.argv)
sys.path.insert(0, str(CODE))

import sqlalchemy as sa  # noqa: E402  (after the path fix)
from sqlalchemy.engine import Connection  # noqa: E402

import storage.sql_metadata  # noqa: E402
from storage.audit_log import Pending, SqlAuditLog  # noqa: E402
from storage.audit_model import AuditEntry  # noqa: E402
from storage.grant_seal import GrantSealer  # noqa: E402
from storage.grants import SqlGrantStore  # noqa: E402
from storage.index import IndexEntry  # noqa: E402
from storage.interfaces import StoredRecord  # noqa: E402
from storage.put_requests import SqlPutRequests  # noqa: E402
from storage.sql_deadlines import install_statement_deadlines  # noqa: E402
from storage.sql_metadata import SqlMetadataStore, make_engine, upgrade  # noqa: E402
from tests.fixtures.databases import postgres_database  # noqa: E402

PG_ADMIN_URL = os.environ.get(
    "MEDVAULT_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
PATIENT = bytes(range(32))
PRINCIPAL = "dr-bench"
PATHS = ("put", "put_key", "read", "event", "batch64")
ENTRIES = (IndexEntry("message_type", "ORU^R01"), IndexEntry("control_id", "MSG00001"))


class SoftIndexer:
    """A software HMAC key standing in for the token's index key (bench only)."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def blind_index(self, value: bytes) -> bytes:
        return hmac.new(self._key, value, hashlib.sha256).digest()


@contextmanager
def database(backend: str) -> Iterator[str]:
    """A URL of a new, empty database of ``backend``; removed afterwards."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="sqlpaths-") as tmp:
            yield f"sqlite:///{Path(tmp) / 'metadata.db'}"
        return
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        yield from postgres_database(admin)
    finally:
        admin.dispose()


def timed(fn: Callable[[], None], ops: int, warmup: int) -> dict[str, float]:
    """CPU per op (total over ``ops``) and wall p50/p90 per op, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    walls: list[float] = []
    cpu0 = time.process_time()
    for _ in range(ops):
        w0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - w0)
    cpu = time.process_time() - cpu0
    walls.sort()
    return {
        "cpu_us": cpu / ops * 1e6,
        "wall_p50_us": walls[len(walls) // 2] * 1e6,
        "wall_p90_us": walls[int(len(walls) * 0.9)] * 1e6,
    }


class Workload:
    """The three paths on one engine; the stores as the service builds them."""

    def __init__(self, engine: sa.Engine) -> None:
        self.now = datetime.now(UTC)
        self.meta, self.log = SqlMetadataStore(engine), SqlAuditLog(engine)
        self.grants = SqlGrantStore(engine, GrantSealer(SoftIndexer()))
        self.requests = SqlPutRequests(engine)
        self.grants.grant(PATIENT, PRINCIPAL, "clerk-bench", self.now + timedelta(days=1), self.now)
        self.stored: list[str] = []

    def row(self) -> StoredRecord:
        """A synthetic 4 KiB record's row (random bytes where secrets would be)."""
        return StoredRecord(
            id=secrets.token_hex(16), version=1, kind="HL7V2",
            content_type="x-application/hl7-v2+er7", patient_index=PATIENT,
            sealed_meta=secrets.token_bytes(160), object_key=f"obj/{secrets.token_hex(16)}",
            kek_version=1, wrapped_dek=secrets.token_bytes(40), size=4096, stored_size=4200,
            ciphertext_sha256=secrets.token_bytes(32), segment_size=1 << 20,
            created_at=self.now, created_by="app:his", supersedes_version=None,
        )  # fmt: skip

    @staticmethod
    def entry(action: str, resource: str) -> AuditEntry:
        return AuditEntry(
            time=datetime.now(UTC), principal=PRINCIPAL, action=action, resource=resource,
            outcome="allowed", role="physician", application="his", patient_index=PATIENT,
            status="OK", source="127.0.0.1",
        )  # fmt: skip

    def commit(self, r: StoredRecord, change: Callable[[Connection], None]) -> None:
        done = self.log.append_pending([Pending(self.entry("PutRecord", f"record/{r.id}"), change)])
        if done[0].error is not None:
            raise done[0].error

    def put(self) -> None:
        r = self.row()  # ~10 us of token_bytes, the same in both checkouts
        self.commit(r, self.meta.insert_change(r, ENTRIES))
        self.stored.append(r.id)

    def put_key(self) -> None:
        r, request_id = self.row(), secrets.token_hex(8)
        if self.requests.find(PRINCIPAL, request_id) is not None:
            raise RuntimeError("a new request id was found")
        insert = self.meta.insert_change(r, ENTRIES)
        remember = self.requests.remember_change(PRINCIPAL, request_id, r.id, r.version)

        def change(connection: Connection) -> None:
            insert(connection)
            remember(connection)

        self.commit(r, change)

    def read(self) -> None:
        record_id = self.stored[len(self.stored) // 2]
        got = self.meta.get(record_id)
        if self.grants.has_access(PRINCIPAL, got.patient_index, datetime.now(UTC)) is None:
            raise RuntimeError("the bench grant was not found")
        self.log.append([self.entry("GetRecord", f"record/{record_id}")])

    def event(self) -> None:
        self.log.append([self.entry("records.read", f"record/{self.stored[0]}/v1")])

    def batch64(self) -> None:
        self.log.append([self.entry("records.read", f"record/{r}/v1") for r in self.stored[:64]])


def run_backend(backend: str, ops: int, warmup: int) -> dict[str, dict[str, float]]:
    """Every path on a fresh database of ``backend`` (reads after the puts); times in us."""
    with database(backend) as url:
        engine = make_engine(url)
        install_statement_deadlines(engine)  # as service.bootstrap does: its listeners run
        try:
            upgrade(engine)
            work = Workload(engine)
            return {name: timed(getattr(work, name), ops, warmup) for name in PATHS}
        finally:
            engine.dispose()


def single(args: argparse.Namespace) -> dict[str, Any]:
    where = Path(storage.sql_metadata.__file__).resolve().parent.parent
    if where != Path(args.code).resolve():  # an installed copy shadowing --code
        raise SystemExit(f"storage imported from {where}, not from {args.code}")
    results = {b: run_backend(b, args.ops, args.warmup) for b in args.backends.split(",")}
    return {"code": str(where), "results": results}


def compare(args: argparse.Namespace) -> None:
    """Each checkout in fresh processes, ABBA, then medians and AFTER / BASE."""
    base, after = args.compare
    runs: dict[str, list[dict[str, Any]]] = {"base": [], "after": []}
    order = [("base", base), ("after", after)]
    for n in range(args.rounds):
        for label, code in order if n % 2 == 0 else order[::-1]:
            cmd = [sys.executable, __file__, "--code", code, "--backends", args.backends,
                   "--ops", str(args.ops), "--warmup", str(args.warmup), "--json", "-"]  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[label].append(json.loads(out))
            print(f"round {n + 1} {label}: done", file=sys.stderr)
    print(f"{args.ops} ops per path, {args.rounds} rounds each, medians over rounds")
    print(f"{'backend':<11}{'path':<9}{'metric':<13}{'base':>10}{'after':>10}{'after/base':>12}")
    summary: dict[str, Any] = {}
    for backend in args.backends.split(","):
        for path in PATHS:
            for metric in ("cpu_us", "wall_p50_us"):
                med = {
                    label: statistics.median(r["results"][backend][path][metric] for r in rs)
                    for label, rs in runs.items()
                }
                ratio = med["after"] / med["base"]
                summary[f"{backend}/{path}/{metric}"] = {**med, "ratio": ratio}
                print(f"{backend:<11}{path:<9}{metric:<13}"
                      f"{med['base']:>10.0f}{med['after']:>10.0f}{ratio:>12.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--ops", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--code", default=str(ROOT), help="checkout whose storage is measured")
    parser.add_argument("--compare", nargs=2, metavar=("BASE", "AFTER"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write results here ('-': stdout, nothing else)")
    args = parser.parse_args()
    if args.compare:
        compare(args)
        return
    report = single(args)
    if args.json == "-":
        print(json.dumps(report))
        return
    for backend, paths in report["results"].items():
        for path, m in paths.items():
            cpu, p50, p90 = m["cpu_us"], m["wall_p50_us"], m["wall_p90_us"]
            print(f"{backend:<11}{path:<9}cpu {cpu:6.0f} us/op  wall p50 {p50:6.0f} p90 {p90:6.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
