"""``server.processes`` and the supervisor's port check (service.supervisor)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from service.config import MAX_PROCESSES, ConfigError, parse
from service.supervisor import metrics_dir, reserve_port
from tests.unit.service.test_audit_switch import BASE


def test_processes_default_to_one_per_usable_core_and_are_validated() -> None:
    assert parse(BASE, Path()).server.process_count == len(os.sched_getaffinity(0))
    assert parse({**BASE, "server": {"processes": 3}}, Path()).server.process_count == 3
    for bad in (-1, MAX_PROCESSES + 1):
        with pytest.raises(ConfigError, match=r"server\.processes must be 0"):
            parse({**BASE, "server": {"processes": bad}}, Path())
    with pytest.raises(ConfigError, match="processes must be int"):
        parse({**BASE, "server": {"processes": "auto"}}, Path())


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_a_taken_port_is_refused_as_a_lone_server_would() -> None:
    """A listener without SO_REUSEPORT (another program, a one-process medvault)."""
    with _listener() as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            reserve_port(f"127.0.0.1:{port}")


def test_a_port_shared_by_reuseport_listeners_is_refused_too() -> None:
    """Another supervisor's workers (SO_REUSEPORT) hold the port: refused, not joined."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(ConfigError, match="cannot listen on"):
            reserve_port(f"127.0.0.1:{port}")


def test_a_held_port_keeps_lone_servers_out_and_lets_workers_in() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    held = reserve_port(f"127.0.0.1:{port}")
    try:
        with socket.socket() as lone:  # grpc.so_reuseport = 0
            lone.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError, match="in use"):
                lone.bind(("127.0.0.1", port))
        with socket.socket() as worker:  # what a worker's gRPC server does
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
    finally:
        for sock in held:
            sock.close()


def test_an_ephemeral_port_is_refused_for_several_processes() -> None:
    with pytest.raises(ConfigError, match="fixed port"):
        reserve_port("127.0.0.1:0")


def test_the_metrics_folder_of_a_killed_supervisor_is_removed_at_the_next_start(
    tmp_path: Path,
) -> None:
    """A supervisor removes its workers' metric files when it stops, but not when it is
    killed: the next one removes the folders of supervisors no longer running."""
    dead_pid = subprocess.Popen(["true"])
    dead_pid.wait()
    dead = tmp_path / f"medvault-metrics-{dead_pid.pid}-abc"
    dead.mkdir()
    (dead / "counter_1.db").write_bytes(b"x")
    alive = tmp_path / f"medvault-metrics-{os.getppid()}-def"  # a live process's
    alive.mkdir()
    other = tmp_path / "medvault-metrics-old"  # not of the pid form: left
    other.mkdir()
    made = Path(metrics_dir(tmp_path))
    assert not dead.exists()
    assert alive.is_dir()
    assert other.is_dir()
    assert made.is_dir()
    assert made.name.startswith(f"medvault-metrics-{os.getpid()}-")
