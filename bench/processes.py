"""``server.processes`` 1 vs 2: 512 KiB PutRecord/GetRecord throughput at 4 and 16 clients.

Run from the project root::

    .venv/bin/python bench/processes.py                 # 96 ops per cell, a few minutes
    .venv/bin/python bench/processes.py --ops 32        # smoke run

One local stack (``LocalStack(home).up()``, as ``medvault stack up``) in a temporary
MEDVAULT_HOME; for each process count the service is started with ``[server]
processes`` set to it (SeaweedFS and the data stay). Each client has its own channels
(the kernel spreads connections, not calls, over the workers): the records clerk
writes, the physician reads (grant check and audit event on every read), 512 KiB random
records streamed in 1 MiB chunks as the CLI does. Throughput = operations / wall time
of the whole cell; service CPU per operation = user + system CPU of the supervisor and
all its workers (``/proc/PID/stat``, every thread) over the cell, divided by its
operations. Prints a table and always exits 0: a benchmark informs, it does not gate.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from put_get import CHUNK, Medvault

from service.localstack.stack import LocalStack

SIZE = 512 << 10
CLIENTS = (4, 16)
PROCESSES = (1, 2)


def _cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all threads); 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def service_pids(supervisor: int) -> list[int]:
    """The service's process and its children (the workers, when it supervises)."""
    pids = [supervisor]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == supervisor:
            pids.append(int(stat.parent.name))
    return pids


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _wait_for_line(log: Path, offset: int, message: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with log.open("rb") as f:
            f.seek(offset)
            if f'"msg": "{message}"'.encode() in f.read():
                return
        time.sleep(0.2)
    raise SystemExit(f"no {message!r} in {log} after {timeout:.0f} s")


def _set_processes(config: Path, count: int) -> None:
    """``processes = count``; all clients are one principal: lift its share (per process)
    of concurrent calls (service.limits), as bench/audit_overhead.py does."""
    text = re.sub(r"(?m)^(processes|max_calls_per_principal) = \d+\n", "", config.read_text())
    lines = f"[server]\nprocesses = {count}\nmax_calls_per_principal = 256\n"
    config.write_text(text.replace("[server]\n", lines, 1))


def _cell(stack: LocalStack, clients: int, ops: int) -> dict[str, dict[str, float]]:
    """Puts then gets of ``ops`` 512 KiB records spread over ``clients`` clients."""
    sessions = [Medvault(stack) for _ in range(clients)]
    per_client = max(1, ops // clients)
    data = secrets.token_bytes(SIZE)
    chunks = [data[i : i + CHUNK] for i in range(0, SIZE, CHUNK)]
    digest = hashlib.sha256(data).digest()
    pids = service_pids(int(stack.layout.service_pid.read_text()))
    ids: list[list[str]] = [[] for _ in sessions]
    result: dict[str, dict[str, float]] = {}
    try:
        for op in ("put", "get"):

            def work(i: int, op: str = op) -> None:
                if op == "put":
                    ids[i] = [sessions[i].put(chunks, digest) for _ in range(per_client)]
                else:
                    for record_id in ids[i]:
                        assert sessions[i].get(record_id) == SIZE

            cpu, started = sum(_cpu(p) for p in pids), time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(work, range(clients)))
            wall = time.perf_counter() - started
            used = sum(_cpu(p) for p in pids) - cpu
            total = per_client * clients
            result[op] = {
                "ops": total, "ops_per_s": total / wall, "mb_per_s": total * SIZE / wall / 1e6,
                "cpu_ms_per_op": 1000 * used / total,
            }  # fmt: skip
    finally:
        for session in sessions:
            session.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--ops", type=int, default=96, help="operations per cell (default 96)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    ns = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="medvault-bench-procs-"))
    stack = LocalStack(home, report=lambda line: print(f"  [stack] {line}", flush=True))
    figures: dict[str, object] = {}
    try:
        stack.prepare()
        for count in PROCESSES:
            _set_processes(stack.layout.config, count)
            offset = _size(stack.layout.service_log)
            stack.up(health_timeout=120)
            if count > 1:  # the other workers start once the first serves
                _wait_for_line(stack.layout.service_log, offset, "supervisor serving")
            pids = service_pids(int(stack.layout.service_pid.read_text()))
            started = sum(_cpu(p) for p in pids)
            figures[f"start/{count}"] = {"cpu_s": started}
            print(f"processes={count}: service pids {pids}, start-up CPU {started:.1f} s",
                  flush=True)  # fmt: skip
            for clients in CLIENTS:
                figures[f"{count}/{clients}"] = _cell(stack, clients, ns.ops)
            stack.down()
    finally:
        stack.down()
        shutil.rmtree(home, ignore_errors=True)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n512 KiB records, {ns.ops} ops per cell - {when}, {os.cpu_count()} CPUs\n")
    print("processes clients  op    ops/s    MB/s   service CPU ms/op   vs 1 process")
    for key, cell in figures.items():
        count, clients = key.split("/")
        if count == "start":
            continue
        for op, row in cell.items():  # type: ignore[attr-defined]
            base = figures[f"1/{clients}"][op]["ops_per_s"]  # type: ignore[index]
            print(f"{count:>9} {clients:>7}  {op:4} {row['ops_per_s']:7.1f} "
                  f"{row['mb_per_s']:7.1f} {row['cpu_ms_per_op']:13.1f} "
                  f"{row['ops_per_s'] / base:15.2f}x")  # fmt: skip
    if ns.json:
        ns.json.write_text(json.dumps({"when": when, "figures": figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
