"""The audit part of a CAdES signature, in process: two commits in series against one item.

Run from the project root (it writes a temporary SQLite file, nothing else)::

    .venv/bin/python bench/sign_audit.py [--threads 8] [--signatures 250] [--rounds 3]

The real ``AuditTrail`` over ``SqlAuditLog`` on a fresh SQLite file per run. Each
"signature" is what SignRecord asks of the trail, with a 600-byte row insert and its
read-back standing in for the signature row:

- ``two``: the read event (``submit``, then ``wait``), then ``signature/<id>`` with the
  row (``record_change``): SignRecord before issue 12's change, two commits in series;
- ``one``: the read event queued as ``before`` of ``signature/<id>`` and the row, one
  item, one transaction (SignRecord now).

Rounds alternate the two. Prints signatures/s and the process's CPU per signature (all
threads: the callers and the audit writer). No gRPC, token or S3: only the trail.
Figures: docs/performance.md, "One audit transaction per signature".
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service.audit.trail import AuditTrail
from storage.audit_log import SqlAuditLog
from storage.audit_model import AuditEntry
from storage.sql_metadata import make_engine, upgrade

rows = sa.Table(
    "bench_signature_rows", sa.MetaData(),
    sa.Column("id", sa.String(32), primary_key=True), sa.Column("sealed", sa.LargeBinary),
)  # fmt: skip
_INSERT = rows.insert()
_SELECT = sa.select(rows.c.id).where(rows.c.id == sa.bindparam("sid"))


def _entry(resource: str) -> AuditEntry:
    return AuditEntry(
        time=datetime.now(UTC), principal="dr-bench", application="", role="physician",
        action="signatures.sign", resource=resource, patient_index=bytes(32),
        outcome="allowed", source="ipv4:127.0.0.1",
    )  # fmt: skip


def _insert(sid: str) -> Callable[[Connection], str]:
    def change(connection: Connection) -> str:
        connection.execute(_INSERT, {"id": sid, "sealed": b"x" * 600})
        return str(connection.execute(_SELECT, {"sid": sid}).scalar_one())

    return change


def two(trail: AuditTrail, n: int) -> None:
    """The read event committed first, then the signature's with its row."""
    sid = secrets.token_hex(16)
    trail.submit(_entry(f"record/{n}/v1")).wait()
    trail.record_change(_entry(f"signature/{sid}"), _insert(sid))


def one(trail: AuditTrail, n: int) -> None:
    """The read event, the signature's and its row in one item."""
    sid = secrets.token_hex(16)
    read = _entry(f"record/{n}/v1")
    trail.record_change(_entry(f"signature/{sid}"), _insert(sid), before=[read])


def run(sign: Callable[[AuditTrail, int], None], threads: int, each: int) -> tuple[float, float]:
    """Signatures per second and CPU milliseconds per signature on a fresh database."""
    with tempfile.TemporaryDirectory(prefix="sign-audit-") as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'audit.db'}")
        upgrade(engine)
        rows.create(engine)
        with AuditTrail(SqlAuditLog(engine), None) as trail:
            for n in range(20):
                sign(trail, n)  # warm-up: connections, statement caches
            workers = [
                threading.Thread(target=lambda: [sign(trail, n) for n in range(each)])
                for _ in range(threads)
            ]
            wall, cpu = time.perf_counter(), time.process_time()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        engine.dispose()
    done = threads * each
    return done / wall, 1000 * cpu / done


def main() -> None:
    """Alternate the two shapes for ``--rounds`` rounds and print each run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--signatures", type=int, default=250, help="per thread")
    parser.add_argument("--rounds", type=int, default=3)
    ns = parser.parse_args()
    for r in range(ns.rounds):
        for name, sign in (("two commits", two), ("one item", one)):
            rate, cpu = run(sign, ns.threads, ns.signatures)
            load = os.getloadavg()[0]
            print(f"round {r + 1} {name:11s}: {rate:7.1f} signatures/s, "
                  f"CPU {cpu:.3f} ms/signature (load {load:.1f})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
