"""Several service processes on one port: ``medvault serve`` with ``server.processes > 1``.

One Python process holds the GIL, so a server uses about one core. The supervisor
(the ``medvault serve`` process, the one the pid file names) starts N workers, each a
``python -m service serve --worker i`` serving the same ``server.listen`` with
SO_REUSEPORT: the kernel spreads incoming connections over them (a connection, with all
its calls, stays with one worker). Workers share the database, bucket and token as
replicas do: one audit chain (the head row lock), one sweeper and one scheduler run per
slot (the election locks and run ledger of ``storage.backup.runs``).

The port is checked and held here. A lone server refuses a taken port
(``grpc.so_reuseport`` 0, so two dev stacks cannot share one by accident); workers must
set it. So before any worker starts the supervisor binds the port as a lone server
would (fails if anything listens there: "cannot listen on"), then keeps a socket bound
to it with SO_REUSEPORT and never listens on it. A lone server, or anything else not
using SO_REUSEPORT, then cannot bind the port while the supervisor lives, even between
a worker's death and its restart. What remains: the kernel lets another process *of the
same user* that sets SO_REUSEPORT itself (any gRPC server left at gRPC's default) join
the group and take a share of the connections; a different user cannot.

The supervisor restarts a worker that exits (after 0.5 s, doubling to 30 s while it keeps
failing; reset once a worker has served for a minute), forwards SIGHUP (policy and CRL
reload) to every worker, and on SIGTERM or SIGINT forwards it and waits for them to
drain (SIGKILL after ``STOP_SECONDS``). Workers get SIGTERM if the supervisor dies
(Linux parent-death signal), and share its process group, so ``kill -- -<pgid>`` stops
all. Metrics: the workers write prometheus_client's multiprocess files into a private
directory and the supervisor serves their sum on ``server.metrics_listen``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from service.config import Config, ConfigError

if TYPE_CHECKING:
    from keystore import Pkcs11SessionPool

log = logging.getLogger(__name__)
STOP_SECONDS = 12.0  # a worker's drain (10 s grace) and close, then SIGKILL; below the 15 s
# after which `medvault stack down` SIGKILLs the whole group
START_SECONDS = 120.0  # the first start of a worker: token, database, bucket
RESTART_FIRST, RESTART_MAX = 0.5, 30.0
HEALTHY_SECONDS = 60.0  # a worker that served this long starts its backoff afresh
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_METRICS_PREFIX = "medvault-metrics-"


def reserve_port(listen: str) -> list[socket.socket]:
    """Check ``listen`` is free as a lone server would; hold it for SO_REUSEPORT workers."""
    host, _, port = listen.rpartition(":")
    failed = f"[server] cannot listen on {listen} (port taken or address invalid)"
    if port == "0":
        raise ConfigError(f"[server] listen {listen}: a fixed port is needed for processes > 1")
    try:
        infos = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, ValueError) as e:
        raise ConfigError(failed) from e
    held: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            with socket.socket(family, kind, proto) as probe:  # what a lone server does
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
            held.append(_hold(family, kind, proto, address))
    except OSError as e:
        for sock in held:
            sock.close()
        raise ConfigError(failed) from e
    return held


def _hold(family: int, kind: int, proto: int, address: tuple[object, ...]) -> socket.socket:
    """A socket bound to ``address`` with SO_REUSEPORT only; it never listens.

    Without SO_REUSEADDR, Linux lets nothing bind beside it but SO_REUSEPORT sockets of
    the same user. Connections a lone server closed may linger in TIME_WAIT and refuse
    that bind for a minute; then the hold also sets SO_REUSEADDR, which keeps out only
    programs that do not set it (a lone gRPC server could then bind while no worker
    listens).
    """
    for reuse_address in (False, True):
        hold = socket.socket(family, kind, proto)
        try:
            hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuse_address))
            hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            hold.bind(address)
        except OSError:
            hold.close()
            if reuse_address:
                raise
            continue
        return hold
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass
class _Worker:
    """One worker slot: its current process (if any) and its restart backoff."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None  # read end of the pipe the worker reports "ready" on
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None


class Supervisor:
    """Start, watch, restart and stop ``count`` workers serving ``config_path``."""

    def __init__(self, config_path: Path, config: Config, count: int) -> None:
        self._config_path = config_path.resolve()
        self._config = config
        self._workers = [_Worker(i) for i in range(count)]
        self._signals: list[int] = []
        self._metrics_dir: str | None = None
        self._metrics_pool: Pkcs11SessionPool | None = None

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; 0, or 1 if the workers could not start."""
        held = reserve_port(self._config.server.listen)
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        previous = signal.set_wakeup_fd(wake_w)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, self._on_signal)
        try:
            self._serve_metrics()
            if not self._start_all(wake_r):
                return 0 if self._stopping() else 1
            log.info("supervisor serving", extra={
                "listen": self._config.server.listen, "processes": len(self._workers),
            })  # fmt: skip
            self._watch(wake_r)
            return 0
        finally:
            self._stop_all()
            signal.set_wakeup_fd(previous)
            os.close(wake_r)
            os.close(wake_w)
            for sock in held:
                sock.close()
            if self._metrics_dir is not None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
            if self._metrics_pool is not None:
                self._metrics_pool.close()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals.append(signum)

    def _stopping(self) -> bool:
        return any(s in (signal.SIGTERM, signal.SIGINT) for s in self._signals)

    # -- start -------------------------------------------------------------------

    def _spawn(self, worker: _Worker) -> None:
        ready_r, ready_w = os.pipe()
        command = [
            sys.executable, "-m", "service", "serve", "--config", str(self._config_path),
            "--worker", str(worker.index), "--ready-fd", str(ready_w),
            "--supervisor-pid", str(os.getpid()),
        ]  # fmt: skip
        env = dict(os.environ)
        if self._metrics_dir is not None:
            env[_MULTIPROC_ENV] = self._metrics_dir
        try:
            worker.process = subprocess.Popen(command, pass_fds=(ready_w,), env=env)  # noqa: S603
        finally:
            os.close(ready_w)
        worker.ready_fd, worker.started, worker.restart_at = ready_r, time.monotonic(), None
        log.info("worker started", extra={"worker": worker.index, "pid": worker.process.pid})

    def _start_all(self, wake_r: int) -> bool:
        """Worker 0 first (it migrates and creates buckets), then the others together."""
        first, *others = self._workers
        self._spawn(first)
        if not self._await_ready([first], wake_r):
            return False
        for worker in others:
            self._spawn(worker)
        return self._await_ready(others, wake_r)

    def _await_ready(self, workers: list[_Worker], wake_r: int) -> bool:
        """Wait for each worker's "ready" line; False if one exits first or we are told
        to stop."""
        waiting = {w.ready_fd: w for w in workers if w.ready_fd is not None}
        deadline = time.monotonic() + START_SECONDS
        while waiting:
            if self._stopping():
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("worker did not start in time", extra={"seconds": START_SECONDS})
                return False
            readable, _, _ = select.select([wake_r, *waiting], [], [], min(left, 1.0))
            _drain(wake_r)
            for fd in readable:
                if fd == wake_r:
                    continue
                worker = waiting.pop(fd)
                line = _read_closing(worker)
                if line != b"ready\n":
                    log.error("worker exited during start-up", extra={"worker": worker.index})
                    return False
        return True

    # -- watch -------------------------------------------------------------------

    def _watch(self, wake_r: int) -> None:
        while not self._stopping():
            select.select([wake_r], [], [], 1.0)
            _drain(wake_r)
            signals, self._signals = self._signals, []
            if signal.SIGHUP in signals:
                log.info("reload requested; forwarding to every worker")
                self._signal_all(signal.SIGHUP)
            self._signals.extend(s for s in signals if s in (signal.SIGTERM, signal.SIGINT))
            if not self._stopping():
                self._reap_and_restart()

    def _reap_and_restart(self) -> None:
        now = time.monotonic()
        for worker in self._workers:
            process = worker.process
            if process is not None and process.poll() is not None:
                self._exited(worker, process, now)
            due = worker.restart_at is not None and now >= worker.restart_at
            if worker.process is None and due:
                self._spawn(worker)

    def _exited(self, worker: _Worker, process: subprocess.Popen[bytes], now: float) -> None:
        _read_closing(worker)
        worker.process = None
        if self._metrics_dir is not None:
            from prometheus_client import multiprocess  # noqa: PLC0415

            multiprocess.mark_process_dead(process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
        if now - worker.started >= HEALTHY_SECONDS:
            worker.failures = 0
        delay = min(RESTART_MAX, RESTART_FIRST * 2**worker.failures)
        worker.failures += 1
        worker.restart_at = now + delay
        log.warning("worker exited; restarting", extra={
            "worker": worker.index, "pid": process.pid, "returncode": process.returncode,
            "restart_in_seconds": delay,
        })  # fmt: skip

    # -- stop --------------------------------------------------------------------

    def _signal_all(self, signum: int) -> None:
        for worker in self._workers:
            if worker.process is not None and worker.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    def _stop_all(self) -> None:
        """SIGTERM every worker, wait for them to drain, SIGKILL what is left."""
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for worker in self._workers:
            if worker.process is None:
                continue
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker did not stop; killing it", extra={"worker": worker.index})
                worker.process.kill()
                worker.process.wait()
            _read_closing(worker)
        log.info("supervisor stopped")

    # -- metrics -------------------------------------------------------------------

    def _serve_metrics(self) -> None:
        """The workers' summed metrics, and the run ledger's, on ``metrics_listen``."""
        listen = self._config.server.metrics_listen
        if not listen:
            return
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server  # noqa: PLC0415

        from service.bootstrap import ledger_reader  # noqa: PLC0415
        from service.metrics import ScheduledRunsCollector  # noqa: PLC0415

        self._metrics_dir = metrics_dir(Path(tempfile.gettempdir()))
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self._metrics_dir)  # type: ignore[no-untyped-call]
        # The ledger's rows count only if their MAC verifies: a token session of its own.
        ledger, self._metrics_pool = ledger_reader(self._config)
        registry.register(ScheduledRunsCollector(ledger))
        host, _, port = listen.rpartition(":")
        start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)


def metrics_dir(parent: Path) -> str:
    """A fresh folder in ``parent`` for the workers' metric files, named after this
    supervisor's pid; first the folders of supervisors no longer running are removed
    (a killed supervisor cannot remove its own). A folder whose pid is alive, whose name
    is not of this form, or that is another user's or a link, is left alone."""
    for old in parent.glob(_METRICS_PREFIX + "*"):
        pid = old.name[len(_METRICS_PREFIX) :].partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)) and _own_folder(old):
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{_METRICS_PREFIX}{os.getpid()}-", dir=parent)


def _own_folder(path: Path) -> bool:
    """A folder (not a link) of this process's user: another user's is not ours to remove."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 512):
            pass


def _read_closing(worker: _Worker) -> bytes:
    """What the worker wrote on its ready pipe (b"" if nothing), and close our end."""
    fd, worker.ready_fd = worker.ready_fd, None
    if fd is None:
        return b""
    try:
        ready, _, _ = select.select([fd], [], [], 0)
        return os.read(fd, 64) if ready else b""
    finally:
        os.close(fd)


def supervise(config_path: Path, config: Config, count: int) -> int:
    """Run ``count`` workers of ``config_path`` until told to stop (``medvault serve``)."""
    return Supervisor(Path(config_path), config, count).run()
