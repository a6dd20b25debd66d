"""``server.processes`` 1 vs 2: 512 KiB PutRecord/GetRecord throughput at 4 and 16 clients.

Run from the project root::

    .venv/bin/python bench/processes.py                  # 3 rounds of 48 ops per cell
    .venv/bin/python bench/processes.py --ops 16 --rounds 1   # smoke run

One local stack (``LocalStack(home).up()``, as ``medvault stack up``) in a temporary
MEDVAULT_HOME, its service set to ``processes = 1``, and beside it a second ``medvault
serve`` of the same home (same database, bucket and token) on another port with
``processes = 2``. Both run for the whole benchmark and the cells alternate between
them (which one goes first alternates by round), so a neighbour's load on a shared
machine hits both alike; figures are medians over the rounds. Each client has its own
channels (the kernel spreads connections, not calls, over the workers): the records
clerk writes, the physician reads (grant check and audit event on every read), 512 KiB
random records streamed in 1 MiB chunks as the CLI does. Throughput = operations / wall
time of a cell; service CPU per operation = user + system CPU of the service's process
and all its workers (``/proc/PID/stat``, every thread) over the cells, divided by
their operations. Prints a table and always exits 0: a benchmark informs, it does not
gate.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from put_get import CHUNK, Medvault

from service.localstack.seaweed import find_free_port
from service.localstack.service_proc import ServiceProcess
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


class _At:
    """The stack's clients, pointed at another service of the same stack."""

    def __init__(self, stack: LocalStack, endpoint: str) -> None:
        self._stack, self._endpoint = stack, endpoint

    def tls_client(self, role: str) -> object:
        return self._stack.tls_client(role)

    def endpoint(self) -> str:
        return self._endpoint


@dataclass
class Service:
    """One of the two services under test: its clients' target and its processes."""

    count: int
    target: object
    supervisor: int

    def cpu(self) -> float:
        return sum(_cpu(p) for p in service_pids(self.supervisor))


def _cell(service: Service, clients: int, ops: int) -> dict[str, dict[str, float]]:
    """Puts then gets of ``ops`` 512 KiB records spread over ``clients`` clients."""
    sessions = [Medvault(service.target) for _ in range(clients)]  # type: ignore[arg-type]
    per_client = max(1, ops // clients)
    data = secrets.token_bytes(SIZE)
    chunks = [data[i : i + CHUNK] for i in range(0, SIZE, CHUNK)]
    digest = hashlib.sha256(data).digest()
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

            cpu, started = service.cpu(), time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(work, range(clients)))
            wall = time.perf_counter() - started
            result[op] = {"ops": per_client * clients, "wall": wall, "cpu": service.cpu() - cpu}
    finally:
        for session in sessions:
            session.close()
    return result


def _second_service(stack: LocalStack, count: int) -> tuple[ServiceProcess, str]:
    """Another ``medvault serve`` of the same home (database, bucket, token) on a free
    port, with ``processes = count``; returns it and its endpoint once all serve."""
    layout = stack.layout
    config = layout.config.with_name(f"config-{count}.toml")
    port = find_free_port(set())
    text = re.sub(r'(?m)^listen = ".*"$', f'listen = "127.0.0.1:{port}"', layout.config.read_text())
    config.write_text(text)
    _set_processes(config, count)
    log = layout.service_log.with_name(f"service-{count}.log")
    service = ServiceProcess(config, layout.service_pid.with_name(f"service-{count}.pid"), log)
    env = {
        "SOFTHSM2_CONF": str(layout.softhsm_dir / "softhsm2.conf"),
        "MEDVAULT_HOME": str(stack.home),
    }
    service.start(env)
    endpoint = f"127.0.0.1:{port}"
    service.wait_healthy(endpoint, stack.tls_client(), 120)
    _wait_for_line(log, 0, "supervisor serving")
    return service, endpoint


def _report(figures: dict[str, list[dict[str, dict[str, float]]]], ops: int, rounds: int) -> None:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n512 KiB records, {ops} ops per cell, {rounds} rounds (medians of ops/s; CPU "
          f"summed over rounds) - {when}, {os.cpu_count()} CPUs\n")  # fmt: skip
    print("processes clients  op    ops/s    MB/s   service CPU ms/op   vs 1 process")
    for clients in CLIENTS:
        for op in ("put", "get"):
            base = 0.0
            for count in PROCESSES:
                cells = [cell[op] for cell in figures[f"{count}/{clients}"]]
                rate = statistics.median(c["ops"] / c["wall"] for c in cells)
                cpu = 1000 * sum(c["cpu"] for c in cells) / sum(c["ops"] for c in cells)
                base = base or rate
                print(f"{count:>9} {clients:>7}  {op:4} {rate:7.1f} {rate * SIZE / 1e6:7.1f} "
                      f"{cpu:13.1f} {rate / base:15.2f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--ops", type=int, default=48, help="operations per cell (default 48)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    ns = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="medvault-bench-procs-"))
    stack = LocalStack(home, report=lambda line: print(f"  [stack] {line}", flush=True))
    figures: dict[str, list[dict[str, dict[str, float]]]] = {}
    extra: ServiceProcess | None = None
    try:
        stack.prepare()
        _set_processes(stack.layout.config, PROCESSES[0])
        stack.up(health_timeout=120)
        one = Service(1, stack, int(stack.layout.service_pid.read_text()))
        extra, endpoint = _second_service(stack, PROCESSES[1])
        two = Service(PROCESSES[1], _At(stack, endpoint), extra.pid or 0)
        for service in (one, two):
            pids = service_pids(service.supervisor)
            print(f"processes={service.count}: pids {pids}, start-up CPU "
                  f"{service.cpu():.1f} s", flush=True)  # fmt: skip
        for round_ in range(ns.rounds):
            for clients in CLIENTS:
                # Alternate which goes first: a neighbour's load hits both alike.
                for service in (one, two) if round_ % 2 == 0 else (two, one):
                    cell = _cell(service, clients, ns.ops)
                    figures.setdefault(f"{service.count}/{clients}", []).append(cell)
            print(f"round {round_ + 1} done", flush=True)
    finally:
        if extra is not None:
            extra.stop()
        stack.down()
        shutil.rmtree(home, ignore_errors=True)
    _report(figures, ns.ops, ns.rounds)
    if ns.json:
        ns.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
