"""A SeaweedFS cluster on 127.0.0.1: a master, three volume servers, a filer, the S3 gateway.

The cluster topology's object store (``medvault stack up --topology cluster``). Each
component is its own ``weed`` process with its own pid file and log, so one can be
stopped and started again on its own (the fault tests stop a volume server):

============  =================================================================
master        ``weed master -defaultReplication=001``: every volume is written to
              two volume servers (one copy, plus one more on another server of
              the same rack), so any one volume server can be lost
volume-1..3   ``weed volume``, one data folder each, all in rack ``rack1`` of data
              centre ``dc1``
filer         ``weed filer`` (its metadata in a LevelDB folder of its own)
s3            ``weed s3``, the gateway medvault talks to
============  =================================================================

Internal ports are chosen free and kept in ``ports.json`` (each HTTP port has its gRPC
twin at +10000, as in :mod:`service.localstack.seaweed`); when a freshly chosen port is
taken between the choice and weed's bind ("address already in use" in a component's
log), the whole cluster is stopped and started again on new ports, up to three times.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.localstack.ca import private_opener, write_private
from service.localstack.layout import log_size, text_since
from service.localstack.seaweed import (
    SeaweedError,
    find_free_port,
    find_weed,
    log_errors,
    ports_in_use,
    weed_running,
    write_s3_identities,
)
from storage import make_minio_client

VOLUME_SERVERS = 3
REPLICATION = "001"  # one extra copy on another server of the same rack
_RACK, _DATA_CENTER = "rack1", "dc1"
_VOLUME_SIZE_LIMIT_MB = 64
_PORTS_FILE = "ports.json"
_PORT_RETRIES = 3
_GRPC_OFFSET = 10000
_GRACE = {"filer": 3.0}  # seconds from SIGTERM to SIGKILL where the default 30 s is wasted


def component_names(volumes: int = VOLUME_SERVERS) -> list[str]:
    """The components in start order."""
    return ["master", *(f"volume-{i}" for i in range(1, volumes + 1)), "filer", "s3"]


@dataclass(frozen=True)
class Component:
    """One weed process of the cluster as ``stack status`` shows it."""

    name: str
    pid: int | None
    endpoint: str


@dataclass(frozen=True)
class Volume:
    """One volume of a collection: its replica placement (``001``) and the servers holding it."""

    id: int
    placement: str
    holders: tuple[str, ...]


class SeaweedCluster:
    """Start, find and stop the cluster whose state lives in ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        logs_dir: Path,
        s3_port: int,
        access_key: str,
        secret_key: str,
        *,
        weed_binary: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.logs_dir = Path(logs_dir)
        self.s3_port = s3_port
        self._access_key = access_key
        self._secret_key = secret_key
        self._weed_binary = weed_binary
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def endpoint(self) -> str:
        """``host:port`` of the S3 gateway."""
        return f"127.0.0.1:{self.s3_port}"

    # -- inspection --------------------------------------------------------------

    def pid(self, name: str) -> int | None:
        """The running component's pid, from this object or its pid file."""
        child = self._children.get(name)
        if child is not None:
            return child.pid if child.poll() is None else None
        try:
            pid = int(self._pid_file(name).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if weed_running(pid, self.data_dir) else None

    def components(self) -> list[Component]:
        """Every component with its pid (None: stopped) and HTTP endpoint."""
        ports = {**(self._read_ports() or {}), "s3": self.s3_port}
        return [
            Component(n, self.pid(n), f"127.0.0.1:{ports[n]}" if n in ports else "")
            for n in component_names()
        ]

    def is_running(self) -> bool:
        """Whether any component runs."""
        return any(self.pid(n) is not None for n in component_names())

    def log_file(self, name: str) -> Path:
        """The log of one component."""
        return self.logs_dir / f"weed-{name}.log"

    def data_nodes(self) -> int:
        """How many volume servers the master counts as alive (0 when it does not answer)."""
        ports = self._read_ports()
        if not ports:
            return 0
        try:
            status = _get_json(f"http://127.0.0.1:{ports['master']}/dir/status")
        except (OSError, ValueError):
            return 0
        topology = status.get("Topology") or {}
        return sum(
            len(rack.get("DataNodes") or [])
            for dc in topology.get("DataCenters") or []
            for rack in dc.get("Racks") or []
        )

    def volumes(self, collection: str) -> dict[int, Volume]:
        """The master's view of ``collection``'s volumes: placement, servers holding a copy."""
        ports = self._read_ports() or {}
        names = {f"127.0.0.1:{port}": name for name, port in ports.items()}
        status = _get_json(f"http://127.0.0.1:{ports['master']}/vol/status")
        found: dict[int, Volume] = {}
        for racks in (status.get("Volumes") or {}).get("DataCenters", {}).values():
            for nodes in racks.values():
                for node, volumes in nodes.items():
                    for v in volumes or []:
                        if v.get("Collection") != collection:
                            continue
                        p = v.get("ReplicaPlacement") or {}
                        placement = f"{p.get('dc', 0)}{p.get('rack', 0)}{p.get('node', 0)}"
                        held = found.get(v["Id"], Volume(v["Id"], placement, ()))
                        holders = (*held.holders, names.get(node, node))
                        found[v["Id"]] = Volume(v["Id"], placement, tuple(sorted(holders)))
        return found

    # -- lifecycle ---------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> None:
        """Start every component not running; return once S3 answers and all volume
        servers have joined. Fresh ports are chosen again when weed finds one taken."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(_PORT_RETRIES + 1):
            fresh = self._read_ports() is None
            offsets = {n: log_size(self.log_file(n)) for n in component_names()}
            try:
                self._start_missing()
                self._wait_ready(timeout)
            except SeaweedError as e:
                taken = set().union(*(
                    ports_in_use(text_since(self.log_file(n), o)) for n, o in offsets.items()
                ))  # fmt: skip
                e.address_in_use = bool(taken)
                caller_port = taken & {self.s3_port, self.s3_port + _GRPC_OFFSET}
                if not (fresh and taken and not caller_port and attempt < _PORT_RETRIES):
                    raise
            else:
                return
            self.stop()
            (self.data_dir / _PORTS_FILE).unlink(missing_ok=True)

    def start_component(self, name: str, timeout: float = 60.0) -> None:
        """Start one stopped component again (its ports and data are kept)."""
        if self.pid(name) is None:
            self._spawn(name)
        self._wait_ready(timeout)

    def stop_component(self, name: str, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop one component (SIGKILL after 30 s); idempotent."""
        self._stop([name], sig)

    def stop(self) -> None:
        """Stop every component, one after another from the gateway down.

        Each exits in well under a second once what it serves has gone; signalled all
        at once, the filer waits ~30 s on its master and volume servers before exiting.
        A filer that has run for a while also waits 15 s on its own metadata
        subscription ("graceful stop timed out after 15s" in its log): it gets
        :data:`_GRACE` seconds, then SIGKILL (its LevelDB store survives a killed process).
        """
        for name in reversed(component_names()):
            self._stop([name], signal.SIGTERM, _GRACE.get(name, 30.0))

    # -- internals ---------------------------------------------------------------

    def _pid_file(self, name: str) -> Path:
        return self.data_dir / f"{name}.pid"

    def _read_ports(self) -> dict[str, int] | None:
        path = self.data_dir / _PORTS_FILE
        try:
            ports: dict[str, int] = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise SeaweedError(f"{path} is corrupt; remove it to choose new ports") from e
        return ports

    def _ports(self) -> dict[str, int]:
        """The persisted internal ports, chosen and saved on first use."""
        ports = self._read_ports()
        if ports is not None:
            return ports
        chosen: set[int] = {self.s3_port}
        ports = {}
        for name in component_names()[:-1]:
            ports[name] = find_free_port(chosen)
            chosen.add(ports[name])
        write_private(self.data_dir / _PORTS_FILE, json.dumps(ports).encode())
        return ports

    def _command(self, name: str) -> list[str]:
        ports = self._ports()
        master = f"127.0.0.1:{ports['master']}"
        common = [find_weed(self._weed_binary)]
        folder = self.data_dir / name
        folder.mkdir(exist_ok=True)
        if name == "master":
            return [*common, "master", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                    f"-port={ports[name]}", f"-mdir={folder}", "-peers=none",
                    f"-defaultReplication={REPLICATION}", "-telemetry=false",
                    f"-volumeSizeLimitMB={_VOLUME_SIZE_LIMIT_MB}"]  # fmt: skip
        if name.startswith("volume-"):
            return [*common, "volume", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                    f"-port={ports[name]}", f"-dir={folder}", f"-mserver={master}",
                    "-max=0", f"-rack={_RACK}", f"-dataCenter={_DATA_CENTER}",
                    "-preStopSeconds=0"]  # fmt: skip
        if name == "filer":
            return [*common, "filer", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                    f"-port={ports[name]}", f"-master={master}",
                    f"-defaultStoreDir={folder}"]  # fmt: skip
        identities = write_s3_identities(
            self.data_dir / "s3_identities.json", self._access_key, self._secret_key
        )
        return [*common, "s3", "-ip.bind=127.0.0.1", f"-port={self.s3_port}",
                f"-filer=127.0.0.1:{ports['filer']}", f"-config={identities}",
                # Extra listeners on fixed default ports would clash between stacks.
                "-port.iceberg=0", "-port.lance=0"]  # fmt: skip

    def _start_missing(self) -> None:
        # Each component retries its upstream (master, filer) by itself: no waiting
        # between starts, which saves seconds per start.
        for name in component_names():
            if self.pid(name) is None:
                self._spawn(name)

    def _spawn(self, name: str) -> None:
        command = self._command(name)
        log_file = self.log_file(name)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab", opener=private_opener) as log:
            # A new session: the cluster outlives the CLI that started it.
            child = subprocess.Popen(  # noqa: S603 - argv list, no shell
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.data_dir / name, start_new_session=True,
            )  # fmt: skip
        self._children[name] = child
        write_private(self._pid_file(name), f"{child.pid}\n".encode())

    def _wait_ready(self, timeout: float) -> None:
        """Until S3 lists buckets and the master counts every volume server."""
        client = make_minio_client(
            self.endpoint, self._access_key, self._secret_key, read_timeout=2.0, retry=False
        )
        deadline = time.monotonic() + timeout
        while True:
            dead = [n for n in component_names() if self.pid(n) is None]
            if dead:
                raise SeaweedError(
                    f"weed {dead[0]} exited during start-up; see {self.log_file(dead[0])}; "
                    f"it said:\n{log_errors(self.log_file(dead[0]))}"
                )
            with contextlib.suppress(Exception):
                if self.data_nodes() == VOLUME_SERVERS:
                    client.list_buckets()
                    return
            if time.monotonic() >= deadline:
                raise SeaweedError(
                    f"SeaweedFS cluster not ready after {timeout:.0f}s (S3 at {self.endpoint}, "
                    f"{self.data_nodes()} of {VOLUME_SERVERS} volume servers); see "
                    f"{self.logs_dir}/weed-*.log"
                )
            time.sleep(0.25)

    def _stop(self, names: Iterable[str], sig: signal.Signals, grace: float = 30.0) -> None:
        running = {n: p for n in names if (p := self.pid(n)) is not None}
        for pid in running.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        for name, pid in running.items():
            if not self._wait_exit(name, pid, grace):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if not self._wait_exit(name, pid, 10.0):
                    raise SeaweedError(f"weed {name} (pid {pid}) did not exit after SIGKILL")
        for name in names:
            self._children.pop(name, None)
            if self.pid(name) is None:
                self._pid_file(name).unlink(missing_ok=True)

    def _wait_exit(self, name: str, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        child = self._children.get(name)
        while True:
            if child is not None:
                gone = child.poll() is not None
            else:
                gone = not weed_running(pid, self.data_dir)
            if gone:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=2) as reply:  # noqa: S310 - our own loopback URL
        value: dict[str, Any] = json.loads(reply.read())
    return value
