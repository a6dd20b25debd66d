"""The local stack: CA, SoftHSM2 token, SeaweedFS, SQLite and the service, in one home.

``LocalStack(home).up()`` is what ``medvault stack up`` runs; the pieces are public too
(:meth:`LocalStack.prepare`, :meth:`start_seaweed`, :meth:`start_service`) so test
fixtures that start the server themselves reuse exactly the code users run.

Every step is idempotent: existing certificates, PINs, tokens, keys and ``config.toml``
are kept, running processes are left running. ``config.toml`` is written once and then
belongs to the operator; ports and endpoints are always read back from it.
Secrets (PINs, S3 keys) are never printed, not even by :meth:`status`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from service import config as service_config
from service.localstack import softhsm
from service.localstack.ca import DevCA, private_opener, write_private
from service.localstack.layout import (
    DEFAULT_S3_PORT,
    DEFAULT_SERVICE_PORT,
    LOOPBACK,
    StackLayout,
    config_unedited,
    ensure_secret,
    find_pkcs11_module,
    log_size,
    pick_port,
    port_free,
    rewrite_ports,
    text_since,
    write_config,
)
from service.localstack.names import DEFAULT_CLIENTS
from service.localstack.seaweed import SeaweedError, SeaweedServer, find_free_port
from service.localstack.service_proc import ServiceProcess, ServiceProcessError, TlsClient
from service.localstack.softhsm import SoftHsmError
from service.localstack.tokenkeys import TokenKeysError, ensure_token_keys

TOKEN_LABEL = "medvault"  # noqa: S105 - a token label, not a password
DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "deploy" / "policy.toml"
WEED_STOP_GRACE = 3.0  # seconds from SIGTERM to SIGKILL on down (see down)
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}  # noqa: S104 - names, not a bind
# How often a start moves off a port another stack bound between probe and bind.
_PORT_RETRIES = 3
# The service's start-up error when its listen address is taken (service.server).
_LISTEN_FAILED = "cannot listen on"


class LocalStackError(Exception):
    """The local stack cannot do what was asked; the message says why and what to do."""


# Each component's own errors; their messages already say what to do.
_COMPONENT_ERRORS = (SoftHsmError, SeaweedError, ServiceProcessError, TokenKeysError, OSError)


@dataclass(frozen=True)
class ComponentStatus:
    """One line of ``medvault stack status``."""

    name: str
    state: str  # running | stopped for processes, present | absent for files, or external
    pid: int | None = None
    endpoint: str = ""
    detail: str = ""

    @property
    def running(self) -> bool:
        """True for a running process."""
        return self.state == "running"

    def line(self) -> str:
        """Human-readable line (never a secret)."""
        parts = [f"{self.name:<10} {self.state:<8}"]
        if self.pid is not None:
            parts.append(f"pid {self.pid}")
        if self.endpoint:
            parts.append(self.endpoint)
        if self.detail:
            parts.append(self.detail)
        return "  ".join(parts)


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``(host, port)`` of a ``HOST:PORT`` endpoint read from config.toml."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise LocalStackError(f"endpoint {endpoint!r} in config.toml must be HOST:PORT")
    return host, int(port)


class LocalStack:
    """One local stack under ``home``."""

    def __init__(self, home: Path, report: Callable[[str], None] | None = None) -> None:
        """``report`` receives progress lines (default: print to stdout)."""
        self.layout = StackLayout(Path(home).absolute())
        self._report = report or (lambda line: print(line, flush=True))
        self._service = ServiceProcess(
            self.layout.config, self.layout.service_pid, self.layout.service_log
        )

    @property
    def home(self) -> Path:
        """The stack's home directory."""
        return self.layout.home

    # -- lifecycle ---------------------------------------------------------------

    def up(self, health_timeout: float = 30.0) -> None:
        """Prepare everything, start SeaweedFS and the service, wait until healthy."""
        with self._locked():
            self._prepare()
            self._start_seaweed()
            self._start_service(health_timeout)
        self._report(f"medvault local stack is up in {self.home}")

    def prepare(self) -> None:
        """Everything except starting processes: dirs, CA, token, keys, config."""
        with self._locked():
            self._prepare()

    def down(self) -> None:
        """Stop the service, then SeaweedFS; idempotent."""
        with self._locked():
            if self._service.stop():
                self._report("stopped medvault service")
            seaweed = self._seaweed()
            if seaweed.is_running():
                # On SIGTERM, weed server's filer waits 15 s on its own S3 gateway's
                # metadata subscription before anything else stops. What weed has
                # acknowledged is already written to its files (volume appends, the
                # filer's LevelDB log), which a killed process keeps: SIGKILL after
                # WEED_STOP_GRACE seconds.
                seaweed.stop(timeout=WEED_STOP_GRACE)
                self._report("stopped SeaweedFS")
        self._report("medvault local stack is down")

    def _prepare(self) -> None:
        self.layout.create_dirs()
        self._prepare_ca()
        self._prepare_token()
        self._prepare_s3_credentials()
        self._write_policy_once()
        self._write_config_once()

    def _write_policy_once(self) -> None:
        """Copy the default access policy into the home; an operator's edits are kept."""
        target = self.home / "policy.toml"
        if not target.exists():
            write_private(target, DEFAULT_POLICY.read_bytes())
            self._report(f"wrote access policy {target} (reload with SIGHUP after editing)")

    def _prepare_ca(self) -> None:
        ca_dir = self.layout.ca_dir
        existed = DevCA.exists(ca_dir)
        ca = DevCA.load_or_create(ca_dir)
        if not existed:
            self._report(f"created CA in {ca_dir}")
        ca.issue_server(ca_dir)
        for name, role in DEFAULT_CLIENTS.items():
            ca.issue_client(ca_dir, name, role=role)
        self._report(f"certificates ready: server, {', '.join(DEFAULT_CLIENTS)}")

    def _prepare_token(self) -> None:
        conf = softhsm.write_softhsm_conf(self.home)
        pin = softhsm.ensure_pin_file(self.layout.pin_file)
        so_pin = softhsm.ensure_pin_file(self.layout.so_pin_file)
        if softhsm.init_token(conf, TOKEN_LABEL, pin, so_pin):
            self._report(f"initialised SoftHSM2 token {TOKEN_LABEL!r} ({conf})")
        signers = [n for n, role in DEFAULT_CLIENTS.items() if role == "physician"]  # + CA cert
        created = ensure_token_keys(self._module(), TOKEN_LABEL, self.layout.pin_file, conf,
                                    signers=signers, ca_dir=self.layout.ca_dir)  # fmt: skip
        if created:
            self._report(f"created token keys: {', '.join(created)}")
        self._report(f"SoftHSM2 token {TOKEN_LABEL!r} ready")

    def _prepare_s3_credentials(self) -> None:
        # Random hex: within every S3 implementation's key syntax.
        ensure_secret(self.layout.s3_access_key_file, 10)
        ensure_secret(self.layout.s3_secret_key_file, 20)

    def _write_config_once(self) -> None:
        if self.layout.config.exists():
            self._report(f"keeping {self.layout.config}")
            return
        service_port, s3_port = _free_ports(DEFAULT_SERVICE_PORT, DEFAULT_S3_PORT, set())
        if write_config(self.layout, service_port, s3_port, find_pkcs11_module()):
            self._report(f"wrote {self.layout.config} (service {LOOPBACK}:{service_port})")

    def _relocate_ports(self, what: str, taken: int) -> service_config.Config:
        """Move off a port another program took, if config.toml is still ours to rewrite.

        Two homes prepared before either started both record the default ports; the
        second to start must not fail or, worse, talk to the first one's processes.
        """
        config = self._config()
        if not config_unedited(self.layout):
            raise LocalStackError(
                f"{what} port {taken} is taken by another program; change it in "
                f"{self.layout.config}"
            )
        service_port = split_endpoint(config.server.listen)[1]
        s3_port = split_endpoint(config.s3.endpoint)[1]
        # Move only the taken one: the other may be in use by this stack already.
        if what == "service":
            service_port = pick_port(DEFAULT_SERVICE_PORT, exclude={taken, s3_port})
        else:
            s3_port = find_free_port({taken, service_port})
        rewrite_ports(self.layout, service_port, s3_port, config.keystore.module)
        self._report(f"{what} port {taken} is taken; moved to a free one in config.toml")
        return self._config()

    # -- processes ---------------------------------------------------------------

    def start_seaweed(self) -> SeaweedServer:
        """Start SeaweedFS on the configured S3 port unless running; return it."""
        with self._locked():
            return self._start_seaweed()

    def start_service(self, health_timeout: float = 30.0) -> None:
        """Start the service in the background unless running; wait until healthy."""
        with self._locked():
            self._start_service(health_timeout)

    def _start_seaweed(self) -> SeaweedServer:
        seaweed = self._seaweed()
        host, port = split_endpoint(self._config().s3.endpoint)
        if host not in _LOCAL_HOSTS:
            self._report(f"S3 endpoint {host}:{port} is not local; not starting SeaweedFS")
            return seaweed
        if seaweed.is_running():
            self._report(f"SeaweedFS already running (pid {seaweed.pid}) on {seaweed.endpoint}")
            return seaweed
        for attempt in range(_PORT_RETRIES + 1):
            if not s3_port_free(port):
                self._relocate_ports("S3", port)
                seaweed = self._seaweed()
                port = seaweed.s3_port
            try:
                seaweed.start()
                break
            except SeaweedError as e:
                # Free when probed, taken when weed bound it: another stack started at
                # the same moment. The bind decides; the loop records another port.
                if not (e.address_in_use and not s3_port_free(port) and attempt < _PORT_RETRIES):
                    raise
        self._report(f"started SeaweedFS on {seaweed.endpoint} (log {self.layout.weed_log})")
        return seaweed

    def _start_service(self, health_timeout: float) -> None:
        if self._service.pid is not None:
            self._report(f"medvault service already running (pid {self._service.pid})")
            return
        env = self.service_env()
        for attempt in range(_PORT_RETRIES + 1):
            _, port = split_endpoint(self._config().server.listen)
            if not port_free(port):
                self._relocate_ports("service", port)
            endpoint = self.endpoint()
            log_offset = log_size(self.layout.service_log)
            pid = self._service.start(env)
            try:
                self._service.wait_healthy(endpoint, self.tls_client(), health_timeout)
                break
            except ServiceProcessError:
                # The port was free when probed, but a stack started at the same moment
                # bound it first: the service's own bind decides, then config records.
                lost_bind = (
                    self._service.pid is None
                    and _LISTEN_FAILED in text_since(self.layout.service_log, log_offset)
                    and not port_free(port)
                )
                if not (lost_bind and attempt < _PORT_RETRIES):
                    raise
        self._report(f"started medvault service on {endpoint} (pid {pid})")

    # -- inspection --------------------------------------------------------------

    def status(self) -> list[ComponentStatus]:
        """The state of each component, also reported line by line."""
        components = [self._ca_status(), self._token_status()]
        if self.layout.config.exists():
            s3_host, s3_port = split_endpoint(self._config().s3.endpoint)
            if s3_host in _LOCAL_HOSTS:
                seaweed = self._seaweed()
                weed_pid = seaweed.pid
                components.append(ComponentStatus(
                    "seaweedfs", process_state(weed_pid), weed_pid, seaweed.endpoint
                ))  # fmt: skip
            else:  # not ours to start: `up` leaves it alone, and so does the exit status
                components.append(ComponentStatus("s3", "external", None, f"{s3_host}:{s3_port}"))
            pid = self._service.pid
            components.append(
                ComponentStatus("service", process_state(pid), pid, self.endpoint(),
                                f"log {self.layout.service_log}")
            )  # fmt: skip
        else:
            components.append(ComponentStatus("config", "absent", detail="run `medvault stack up`"))
        for component in components:
            self._report(component.line())
        return components

    def _ca_status(self) -> ComponentStatus:
        ca_dir = self.layout.ca_dir
        if not DevCA.exists(ca_dir):
            return ComponentStatus("ca", "absent")
        return ComponentStatus("ca", "present", detail=str(ca_dir))

    def _token_status(self) -> ComponentStatus:
        tokens = self.layout.softhsm_dir / "tokens"
        if not (tokens.is_dir() and any(tokens.iterdir())):
            return ComponentStatus("softhsm", "absent")
        return ComponentStatus("softhsm", "present", detail=f"token {TOKEN_LABEL!r} in {tokens}")

    def endpoint(self) -> str:
        """``host:port`` a local client connects to (a wildcard listen becomes loopback)."""
        host, port = split_endpoint(self._config().server.listen)
        return f"{LOOPBACK if host in _WILDCARD_HOSTS else host}:{port}"

    def service_env(self) -> dict[str, str]:
        """The environment a ``medvault serve`` (or any command) of this stack needs."""
        return {
            "SOFTHSM2_CONF": str(self.layout.softhsm_dir / "softhsm2.conf"),
            "MEDVAULT_HOME": str(self.home),
        }

    def tls_client(self, client: str = "local-admin") -> TlsClient:
        """The CA, certificate and key files of ``client``: a client name or a role."""
        by_role = {role: name for name, role in DEFAULT_CLIENTS.items()}
        client = by_role.get(client, client)
        tls = TlsClient(
            self.layout.ca_dir / "ca.pem",
            self.layout.client_cert(client),
            self.layout.client_key(client),
        )
        missing = [p for p in (tls.ca, tls.cert, tls.key) if not p.is_file()]
        if missing:
            known = sorted(p.stem[len("client-"):] for p in self.layout.ca_dir.glob("client-*.pem"))
            raise LocalStackError(
                f"no client certificate {client!r} in {self.layout.ca_dir} "
                f"(known: {', '.join(known) or 'none'}; run `medvault stack up`)"
            )
        return tls

    def env(self, client: str = "local-admin") -> str:
        """Shell ``export`` lines pointing a client at this stack as ``client``."""
        tls = self.tls_client(client)
        values = {
            "MEDVAULT_ENDPOINT": self.endpoint(),
            "MEDVAULT_CA": str(tls.ca),
            "MEDVAULT_CERT": str(tls.cert),
            "MEDVAULT_KEY": str(tls.key),
        }
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())

    # -- helpers -----------------------------------------------------------------

    def _config(self) -> service_config.Config:
        try:
            return service_config.load(self.layout.config)
        except service_config.ConfigError as e:
            raise LocalStackError(str(e)) from e

    def _module(self) -> str:
        if self.layout.config.exists():
            return self._config().keystore.module
        return find_pkcs11_module()

    def _seaweed(self) -> SeaweedServer:
        """A handle on this stack's SeaweedFS (reattaches through its pid file)."""
        port = 0
        if self.layout.config.exists():
            port = split_endpoint(self._config().s3.endpoint)[1]
        return SeaweedServer(
            self.layout.s3_dir,
            port,
            read_secret_file(self.layout.s3_access_key_file),
            read_secret_file(self.layout.s3_secret_key_file),
            log_file=self.layout.weed_log,
        )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize up/down/prepare of one home; component errors become ours."""
        self.layout.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.layout.run_dir / "stack.lock", "w", opener=private_opener) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            except _COMPONENT_ERRORS as e:
                raise LocalStackError(str(e)) from e


def process_state(pid: int | None) -> str:
    """``running`` or ``stopped``, as ``stack status`` says it."""
    return "stopped" if pid is None else "running"


def _free_ports(service_port: int, s3_port: int, taken: set[int]) -> tuple[int, int]:
    """Keep each wanted port when free, else pick another; never the same twice."""
    service_port = pick_port(service_port, exclude={*taken, s3_port})
    if s3_port in taken or s3_port == service_port or not s3_port_free(s3_port):
        s3_port = find_free_port({*taken, service_port})
    return service_port, s3_port


def s3_port_free(port: int) -> bool:
    """Whether SeaweedFS's S3 port and its gRPC twin are both free."""
    # weed also serves gRPC on the S3 port + 10000.
    return port_free(port) and port_free(port + 10000)


def read_secret_file(path: Path) -> str:
    """A secret file's stripped text ("" when unreadable); never printed."""
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def default_home() -> Path:
    """``MEDVAULT_HOME`` if set, else ``.medvault`` in the working directory."""
    return Path(os.environ.get("MEDVAULT_HOME") or ".medvault").absolute()

