"""The medvault service as a background process of the local stack.

Started as ``<python> -m service serve --config <home>/config.toml`` in its own session
(it outlives the CLI, and a terminal's Ctrl-C does not reach it), output appended to
``logs/service.log``, pid in ``run/service.pid``. Readiness is the standard gRPC health
check over mutual TLS with a client certificate of the stack's own CA, so "healthy"
means exactly what a real client would experience.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import service
from service.localstack.ca import private_opener as _private_opener
from service.localstack.ca import write_private
from service.localstack.layout import live_argv

# The service package's parent directory: the child imports the very same code.
_SOURCE_ROOT = Path(service.__file__).resolve().parent.parent


class ServiceProcessError(RuntimeError):
    """The service did not start, did not become healthy, or did not stop."""


@dataclass(frozen=True)
class TlsClient:
    """The files a client needs for mutual TLS."""

    ca: Path
    cert: Path
    key: Path


def check_health(endpoint: str, tls: TlsClient, timeout: float = 2.0) -> bool:
    """True when the gRPC health service at ``endpoint`` answers SERVING for ``""``."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(),
        private_key=tls.key.read_bytes(),
        certificate_chain=tls.cert.read_bytes(),
    )
    with grpc.secure_channel(endpoint, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _alive(pid: int, config: Path) -> bool:
    """Whether ``pid`` runs and is the medvault ``serve`` process of ``config``, not merely
    some ``serve`` (``layout.live_argv``: pids are reused)."""
    with contextlib.suppress(ChildProcessError):
        # Our own child (tests start and stop in one process) must be reaped, or it
        # lingers as a zombie that os.kill still reports as alive.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    argv = live_argv(pid)
    if argv is None:
        return False
    if not argv:
        return True  # no procfs (not Linux): trust the signal probe
    return b"service" in argv and b"serve" in argv and _runs(argv, config)


def _runs(argv: list[bytes], config: Path) -> bool:
    """Whether ``argv``'s ``--config`` names ``config`` (the same file, however spelt)."""
    try:
        named = argv[argv.index(b"--config") + 1]
    except (ValueError, IndexError):
        return False
    try:
        return Path(os.fsdecode(named)).resolve() == config.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop (3.11, 3.12)
        return False


class ServiceProcess:
    """Start, find, health-check and stop the service of one local stack."""

    def __init__(self, config: Path, pid_file: Path, log_file: Path) -> None:
        """Describe the process; nothing is started until :meth:`start`."""
        self.config = config
        self.pid_file = pid_file
        self.log_file = log_file
        # Only set in the process that spawned the service; others use the pid file.
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The running service's pid, or None (a stale pid file counts as stopped)."""
        if self._process is not None:
            # Our own child: poll() is exact, and right after fork (before exec) its
            # /proc cmdline is still ours, which _alive() would take for a stranger.
            return self._process.pid if self._process.poll() is None else None
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid, self.config) else None

    @property
    def exit_status(self) -> int | None:
        """How a service this object started ended (minus the signal's number when a
        signal ended it); None while it runs, or when another process started it."""
        return None if self._process is None else self._process.poll()

    def start(self, env: Mapping[str, str]) -> int:
        """Spawn the service with ``env`` added to this environment; return its pid."""
        child_env = {**os.environ, **env}
        # Prepend so the child runs this checkout even when it is not pip-installed.
        path = child_env.get("PYTHONPATH")
        child_env["PYTHONPATH"] = f"{_SOURCE_ROOT}{os.pathsep}{path}" if path else str(_SOURCE_ROOT)
        command = [sys.executable, "-m", "service", "serve", "--config", str(self.config)]
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab", opener=_private_opener) as log:
            process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.config.parent,
                env=child_env,
                start_new_session=True,
            )
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        write_private(self.pid_file, f"{process.pid}\n".encode())
        self._process = process
        return process.pid

    def wait_healthy(self, endpoint: str, tls: TlsClient, timeout: float = 30.0) -> None:
        """Return once the health check passes; raise naming the log if it never does."""
        deadline = time.monotonic() + timeout
        while True:
            if self.pid is None:
                raise ServiceProcessError(
                    f"the medvault service exited during start-up; see {self.log_file}"
                )
            if check_health(endpoint, tls, timeout=min(2.0, timeout)):
                return
            if time.monotonic() >= deadline:
                raise ServiceProcessError(
                    f"the medvault service at {endpoint} is not healthy after "
                    f"{timeout:.0f}s; see {self.log_file}"
                )
            time.sleep(0.25)

    def stop(self, timeout: float = 15.0) -> bool:
        """SIGTERM, then SIGKILL after ``timeout``; True when a process was stopped."""
        pid = self.pid
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        # The service leads its own session: signal the group so helpers go too.
        _signal_group(pid, signal.SIGTERM)
        if not _wait_exit(pid, self.config, timeout):
            _signal_group(pid, signal.SIGKILL)
            if not _wait_exit(pid, self.config, 5.0):
                raise ServiceProcessError(f"the medvault service (pid {pid}) survived SIGKILL")
        self.pid_file.unlink(missing_ok=True)
        self._process = None
        return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)  # in case it is no longer a group leader


def _wait_exit(pid: int, config: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid, config):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True
