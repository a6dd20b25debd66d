"""The cluster topology of the local stack: replicas over PostgreSQL and a SeaweedFS cluster.

``medvault stack up --topology cluster [--replicas N] [--database-url URL]`` runs, in one
home, what a hospital runs across machines (docs/operations.md, "Cluster topology"):

* a SeaweedFS cluster (:mod:`service.localstack.seaweed_cluster`): master, three volume
  servers with replication 001, filer, S3 gateway;
* the machine's PostgreSQL: a database of the stack's own (``medvault_stack_<hash of the
  home>`` on 127.0.0.1:5432 unless ``--database-url`` names another), created if missing;
* N service replicas (default 2), each ``medvault serve`` on its own port with the same
  token, bucket, CA and database. Each replica's config ``replica-<i>.toml`` is derived
  from ``config.toml`` at every start, changing only the ports it listens on (gRPC, and
  the DICOM, MLLP and metrics listeners where ``config.toml`` configures them).

The CA, the token, the keys and the policy are prepared exactly as for the single-node
stack (:class:`~service.localstack.stack.LocalStack`, which this class extends).
``cluster.json`` in the home records the topology (replica count and ports), so
``status``, ``env`` and ``down`` find it without flags.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from service.localstack.ca import write_private
from service.localstack.layout import (
    DEFAULT_S3_PORT,
    DEFAULT_SERVICE_PORT,
    LOOPBACK,
    config_unedited,
    find_pkcs11_module,
    log_size,
    pick_port,
    port_free,
    rewrite_ports,
    text_since,
    write_config,
)
from service.localstack.names import DEFAULT_REPLICAS
from service.localstack.seaweed import SeaweedServer, find_free_port
from service.localstack.seaweed_cluster import SeaweedCluster
from service.localstack.service_proc import ServiceProcess, ServiceProcessError
from service.localstack.stack import (
    ComponentStatus,
    LocalStack,
    LocalStackError,
    process_state,
    read_secret_file,
    s3_port_free,
    split_endpoint,
)

CLUSTER_FILE = "cluster.json"
DEFAULT_PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
_PORT_RETRIES = 3
_LISTEN_FAILED = "cannot listen on"
# The listeners a replica may have, by config section and key.
_LISTENERS = {("server", "listen"): "grpc", ("server", "metrics_listen"): "metrics",
              ("dicom", "listen"): "dicom", ("mllp", "listen"): "mllp"}  # fmt: skip
_SECTION = re.compile(r"^\s*\[([A-Za-z0-9_.-]+)\]\s*(#.*)?$")
_KEY = re.compile(r'^(\s*)([A-Za-z0-9_]+)(\s*=\s*)"([^"]*)"(.*)$')


def default_database_url(home: Path) -> str:
    """The stack's own database on the machine's PostgreSQL, named after its home."""
    digest = hashlib.sha256(str(home).encode()).hexdigest()[:10]
    return f"{DEFAULT_PG_SERVER}/medvault_stack_{digest}"


def open_stack(
    home: Path,
    topology: str | None = None,
    *,
    replicas: int | None = None,
    database_url: str | None = None,
    report: Callable[[str], None] | None = None,
) -> LocalStack:
    """The stack in ``home``: the topology recorded there, or the one asked for a new home."""
    recorded = "cluster" if (home / CLUSTER_FILE).exists() else None
    if recorded is None and (home / "config.toml").exists():
        recorded = "single"
    if topology and recorded and topology != recorded:
        raise LocalStackError(
            f"{home} holds a {recorded}-topology stack; use another --home for {topology}"
        )
    if (topology or recorded) != "cluster":
        if replicas is not None or database_url:
            raise LocalStackError("--replicas and --database-url need --topology cluster")
        return LocalStack(home, report)
    return ClusterStack(home, report, replicas=replicas, database_url=database_url)


class ClusterStack(LocalStack):
    """The cluster topology in ``home``."""

    def __init__(
        self,
        home: Path,
        report: Callable[[str], None] | None = None,
        *,
        replicas: int | None = None,
        database_url: str | None = None,
    ) -> None:
        """``replicas`` and ``database_url`` apply to a new home or change a recorded count."""
        super().__init__(home, report)
        if replicas is not None and replicas < 1:
            raise LocalStackError(f"--replicas must be at least 1, not {replicas}")
        self._wanted_replicas = replicas
        self._database_url = database_url or default_database_url(self.home)
        self._processes: dict[int, ServiceProcess] = {}

    # -- lifecycle ---------------------------------------------------------------

    def up(self, health_timeout: float = 60.0) -> None:
        """Prepare, create the database, start the SeaweedFS cluster and every replica."""
        with self._locked():
            self._prepare()
            self._record_replicas()
            self._ensure_database()
            self._start_cluster()
            self._start_service(health_timeout)
            for index in set(self._known_replicas()) - set(self._replica_range()):
                if self.replica(index).stop():  # --replicas lowered: the surplus goes
                    self._report(f"stopped medvault replica {index} (beyond --replicas)")
        self._report(f"medvault cluster stack is up in {self.home}: {self.endpoint()}")

    def down(self) -> None:
        """Stop every replica, then the SeaweedFS cluster; the database is kept."""
        with self._locked():
            # In parallel: each takes seconds to drain its calls and close its pools.
            indexes = self._known_replicas()
            with ThreadPoolExecutor(max(1, len(indexes))) as pool:
                stopped = list(pool.map(lambda i: self.replica(i).stop(), indexes))
            for index, was_running in zip(indexes, stopped, strict=True):
                if was_running:
                    self._report(f"stopped medvault replica {index}")
            cluster = self.seaweed_cluster()
            if cluster.is_running():
                cluster.stop()
                self._report("stopped the SeaweedFS cluster")
        self._report("medvault cluster stack is down (its PostgreSQL database is kept)")

    def replica(self, index: int) -> ServiceProcess:
        """A handle on replica ``index`` (1-based); reattaches through its pid file."""
        if index not in self._processes:
            self._processes[index] = ServiceProcess(
                self.home / f"replica-{index}.toml",
                self.layout.run_dir / f"service-{index}.pid",
                self.layout.logs_dir / f"service-{index}.log",
            )
        return self._processes[index]

    def seaweed_cluster(self) -> SeaweedCluster:
        """A handle on the stack's SeaweedFS cluster (reattaches through its pid files)."""
        port = split_endpoint(self._config().s3.endpoint)[1] if self.layout.config.exists() else 0
        return SeaweedCluster(
            self.layout.s3_dir, self.layout.logs_dir, port,
            read_secret_file(self.layout.s3_access_key_file),
            read_secret_file(self.layout.s3_secret_key_file),
        )  # fmt: skip

    # -- what clients see ----------------------------------------------------------

    def replica_ports(self, index: int) -> dict[str, int]:
        """The ports replica ``index`` listens on: ``grpc`` and any of dicom, mllp, metrics."""
        return dict(self._topology()["ports"].get(str(index), {}))

    def endpoints(self) -> list[str]:
        """``host:port`` of every replica's gRPC listener."""
        return [f"{LOOPBACK}:{self.replica_ports(i)['grpc']}" for i in self._replica_range()]

    def endpoint(self) -> str:
        """Every replica, comma-separated: the CLI balances calls over them."""
        return ",".join(self.endpoints())

    def status(self) -> list[ComponentStatus]:
        """CA, token, each weed process, the database and each replica."""
        components = [self._ca_status(), self._token_status()]
        if not self.layout.config.exists():
            components.append(ComponentStatus("config", "absent", detail="run `medvault stack up`"))
        else:
            for weed in self.seaweed_cluster().components():
                components.append(ComponentStatus(
                    weed.name, process_state(weed.pid), weed.pid, weed.endpoint
                ))  # fmt: skip
            url = sa.make_url(self._config().database.url)
            where = f"{url.host}:{url.port or 5432}/{url.database}"
            components.append(ComponentStatus("postgresql", "external", None, where))
            for index in self._replica_range():
                process = self.replica(index)
                ports = self.replica_ports(index)
                extra = ", ".join(f"{k} {v}" for k, v in ports.items() if k != "grpc")
                components.append(ComponentStatus(
                    f"replica-{index}", process_state(process.pid), process.pid,
                    f"{LOOPBACK}:{ports.get('grpc', 0)}",
                    f"{extra + '; ' if extra else ''}log {process.log_file}",
                ))  # fmt: skip
        for component in components:
            self._report(component.line())
        return components

    # -- internals: topology file --------------------------------------------------

    def _topology(self) -> dict[str, Any]:
        try:
            value: dict[str, Any] = json.loads((self.home / CLUSTER_FILE).read_text())
        except FileNotFoundError:
            return {"replicas": self._wanted_replicas or DEFAULT_REPLICAS, "ports": {}}
        except ValueError as e:
            raise LocalStackError(f"{self.home / CLUSTER_FILE} is corrupt: {e}") from e
        return value

    def _save_topology(self, topology: dict[str, Any]) -> None:
        write_private(self.home / CLUSTER_FILE, json.dumps(topology, indent=1).encode())

    def _record_replicas(self) -> None:
        topology = self._topology()
        if self._wanted_replicas is not None:
            topology["replicas"] = self._wanted_replicas
        self._save_topology(topology)

    def _replica_range(self) -> range:
        return range(1, int(self._topology()["replicas"]) + 1)

    def _known_replicas(self) -> list[int]:
        """Replicas of the recorded count, and any beyond it still running."""
        found = {int(p.stem.split("-")[1]) for p in self.layout.run_dir.glob("service-*.pid")
                 if p.stem.split("-")[1].isdigit()}  # fmt: skip
        return sorted(found | set(self._replica_range()))

    # -- internals: preparing ----------------------------------------------------

    def _write_config_once(self) -> None:
        if self.layout.config.exists():
            self._report(f"keeping {self.layout.config}")
            return
        service_port = pick_port(DEFAULT_SERVICE_PORT, exclude=set())
        s3_port = DEFAULT_S3_PORT if s3_port_free(DEFAULT_S3_PORT) else find_free_port()
        written = write_config(
            self.layout, service_port, s3_port, find_pkcs11_module(), self._database_url
        )
        if written:
            self._report(f"wrote {self.layout.config} (cluster topology, {self._database_url})")

    def _ensure_database(self) -> None:
        """Create the configured PostgreSQL database when it does not exist yet."""
        url = sa.make_url(self._config().database.url)
        if not url.drivername.startswith("postgresql"):
            return  # SQLite (single machine only) or a database someone else created
        name = url.database or ""
        admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT",
                                 connect_args={"connect_timeout": 5})  # fmt: skip
        try:
            with admin.connect() as connection:
                query = sa.text("SELECT 1 FROM pg_database WHERE datname = :name")
                if connection.scalar(query, {"name": name}) is None:
                    quoted = connection.dialect.identifier_preparer.quote(name)
                    connection.execute(sa.text(f"CREATE DATABASE {quoted}"))
                    self._report(f"created PostgreSQL database {name} on {url.host}")
        except sa.exc.SQLAlchemyError as e:
            raise LocalStackError(
                f"PostgreSQL at {url.host}:{url.port or 5432} refused creating database "
                f"{name} ({type(e).__name__}); start it, or pass --database-url"
            ) from e
        finally:
            admin.dispose()

    # -- internals: processes ----------------------------------------------------

    def start_seaweed(self) -> SeaweedServer:
        """Not in this topology: the single-node server would shadow the cluster."""
        raise LocalStackError("the cluster topology runs a SeaweedFS cluster; use `up`")

    def _start_cluster(self) -> SeaweedCluster:
        cluster = self.seaweed_cluster()
        if not cluster.is_running() and not s3_port_free(cluster.s3_port):
            self._move_s3_port(cluster.s3_port)
            cluster = self.seaweed_cluster()
        cluster.start()
        self._report(f"SeaweedFS cluster up: S3 on {cluster.endpoint}, logs in "
                     f"{self.layout.logs_dir}/weed-*.log")  # fmt: skip
        return cluster

    def _move_s3_port(self, taken: int) -> None:
        config = self._config()
        if not config_unedited(self.layout):
            raise LocalStackError(f"S3 port {taken} is taken by another program; change it "
                                  f"in {self.layout.config}")  # fmt: skip
        rewrite_ports(self.layout, split_endpoint(config.server.listen)[1],
                      find_free_port({taken}), config.keystore.module,
                      config.database.url)  # fmt: skip
        self._report(f"S3 port {taken} is taken; moved to a free one in config.toml")

    def _start_service(self, health_timeout: float) -> None:
        env = self.service_env()
        for attempt in range(_PORT_RETRIES + 1):
            started = self._spawn_missing(env)
            lost = self._wait_started(started, health_timeout, last=attempt == _PORT_RETRIES)
            if not lost:
                return
            topology = self._topology()
            for index in lost:  # another program bound a port between probe and bind
                topology["ports"].pop(str(index), None)
            self._save_topology(topology)

    def _spawn_missing(self, env: dict[str, str]) -> dict[int, int]:
        """Start each replica not running; its index -> log offset at its start."""
        started: dict[int, int] = {}
        for index in self._replica_range():
            process = self.replica(index)
            if process.pid is not None:
                self._report(f"replica {index} already running (pid {process.pid})")
                continue
            self._write_replica_config(index)
            started[index] = log_size(process.log_file)
            process.start(env)
        return started

    def _wait_started(self, started: dict[int, int], timeout: float, *, last: bool) -> list[int]:
        """Wait for each started replica; the ones that lost a port bind (to retry)."""
        lost: list[int] = []
        for index, offset in started.items():
            process, ports = self.replica(index), self.replica_ports(index)
            endpoint = f"{LOOPBACK}:{ports['grpc']}"
            try:
                process.wait_healthy(endpoint, self.tls_client(), timeout)
            except ServiceProcessError:
                bind_lost = process.pid is None and _LISTEN_FAILED in text_since(
                    process.log_file, offset
                )
                if last or not bind_lost:
                    raise
                lost.append(index)
                continue
            self._report(f"started medvault replica {index} on {endpoint} (pid {process.pid})")
        return lost

    def _write_replica_config(self, index: int) -> None:
        """``replica-<i>.toml``: config.toml with this replica's own ports."""
        text = self.layout.config.read_text()
        ports = self._replica_ports_chosen(index, text)
        share = max(1, len(os.sched_getaffinity(0)) // len(self._replica_range()))
        derived = with_process_share(with_listener_ports(text, ports), share)
        header = (
            f"# Replica {index} of the cluster stack: written by `medvault stack up` from "
            "config.toml at every start.\n# Edit config.toml, not this file.\n"
        )
        write_private(self.home / f"replica-{index}.toml", (header + derived).encode())

    def _replica_ports_chosen(self, index: int, text: str) -> dict[str, int]:
        """This replica's recorded ports, each re-chosen when another program holds it."""
        topology = self._topology()
        # Each configured port, counted up by replica (7443, 7444, ...) where free.
        wanted = {name: int(value.rpartition(":")[2] or 0) + index - 1
                  for (section, key), name in _LISTENERS.items()
                  if (value := config_value(text, section, key))}  # fmt: skip
        taken = {p for i, ports in topology["ports"].items() if i != str(index)
                 for p in ports.values()}  # fmt: skip
        ports = {k: v for k, v in topology["ports"].get(str(index), {}).items() if k in wanted}
        for name, default in sorted(wanted.items()):
            if name not in ports or not port_free(ports[name]):
                ports[name] = pick_port(max(default, 1), exclude=taken | set(ports.values()))
        taken.update(ports.values())
        topology["ports"][str(index)] = ports
        self._save_topology(topology)
        return ports


def config_value(text: str, section: str, key: str) -> str:
    """The string value of ``key`` in ``[section]`` of a TOML text ("" when absent)."""
    current = ""
    for line in text.splitlines():
        if head := _SECTION.match(line):
            current = head.group(1)
        elif current == section and (pair := _KEY.match(line)) and pair.group(2) == key:
            return pair.group(4)
    return ""


def with_listener_ports(text: str, ports: dict[str, int]) -> str:
    """``text`` with each configured listener's port replaced (its host kept)."""
    out, current = [], ""
    for line in text.splitlines(keepends=True):
        replaced = line
        if head := _SECTION.match(line):
            current = head.group(1)
        elif (pair := _KEY.match(line.rstrip("\n"))) and pair.group(4):
            name = _LISTENERS.get((current, pair.group(2)))
            if name in ports:
                host = pair.group(4).rpartition(":")[0]
                indent, key, equals, _, rest = pair.groups()
                replaced = f'{indent}{key}{equals}"{host}:{ports[name]}"{rest}\n'
        out.append(replaced)
    return "".join(out)


_PROCESSES = re.compile(r"^(\s*)processes(\s*=\s*)(\d+)(.*)$")


def with_process_share(text: str, share: int) -> str:
    """``text`` with ``server.processes`` set to ``share`` where it is absent or 0 (one per
    core): replicas on one host divide its cores between them instead of each starting one
    process per core. A count set in config.toml is kept."""
    lines = text.splitlines(keepends=True)
    current, server_at = "", None
    for i, line in enumerate(lines):
        if head := _SECTION.match(line):
            current = head.group(1)
            server_at = i if current == "server" else server_at
        elif current == "server" and (found := _PROCESSES.match(line.rstrip("\n"))):
            if int(found.group(3)) != 0:
                return text
            lines[i] = f"{found.group(1)}processes{found.group(2)}{share}{found.group(4)}\n"
            return "".join(lines)
    if server_at is None:
        return f"{text}\n[server]\nprocesses = {share}\n"
    lines.insert(server_at + 1, f"processes = {share}\n")
    return "".join(lines)
