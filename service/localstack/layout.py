"""Where the local stack keeps its files, and the ``config.toml`` it writes once.

Everything lives under one directory (``MEDVAULT_HOME``, by default ``./.medvault``), so
two stacks with different homes share nothing: no file, and no port (every default
port is probed and replaced by a free one when taken, and the choice is recorded in
``config.toml``).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from service.localstack.ca import write_private

DEFAULT_SERVICE_PORT = 7443
DEFAULT_S3_PORT = 8333
LOOPBACK = "127.0.0.1"
DEFAULT_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)


@dataclass(frozen=True)
class StackLayout:
    """The paths of one local stack, all under ``home``."""

    home: Path

    @property
    def config(self) -> Path:
        """The service configuration (written once, then owned by the operator)."""
        return self.home / "config.toml"

    @property
    def ca_dir(self) -> Path:
        """CA, server and client certificates and keys."""
        return self.home / "ca"

    @property
    def softhsm_dir(self) -> Path:
        """SoftHSM2 configuration and token directory."""
        return self.home / "softhsm"

    @property
    def secrets_dir(self) -> Path:
        """PINs and S3 credentials, one per 0600 file."""
        return self.home / "secrets"

    @property
    def s3_dir(self) -> Path:
        """SeaweedFS data, ports and pid file."""
        return self.home / "s3"

    @property
    def db_dir(self) -> Path:
        """The SQLite metadata database."""
        return self.home / "db"

    @property
    def logs_dir(self) -> Path:
        """Logs of the processes the stack starts."""
        return self.home / "logs"

    @property
    def run_dir(self) -> Path:
        """Pid file of the service and the stack lock."""
        return self.home / "run"

    @property
    def pin_file(self) -> Path:
        """The token's user PIN."""
        return self.secrets_dir / "pin"

    @property
    def so_pin_file(self) -> Path:
        """The token's security-officer PIN."""
        return self.secrets_dir / "so-pin"

    @property
    def s3_access_key_file(self) -> Path:
        """The S3 access key id."""
        return self.secrets_dir / "s3-access-key"

    @property
    def s3_secret_key_file(self) -> Path:
        """The S3 secret key."""
        return self.secrets_dir / "s3-secret-key"

    @property
    def database(self) -> Path:
        """The SQLite file."""
        return self.db_dir / "medvault.sqlite"

    @property
    def service_log(self) -> Path:
        """stdout and stderr of the background service."""
        return self.logs_dir / "service.log"

    @property
    def weed_log(self) -> Path:
        """stdout and stderr of SeaweedFS."""
        return self.logs_dir / "weed.log"

    @property
    def service_pid(self) -> Path:
        """Pid of the background service."""
        return self.run_dir / "service.pid"

    def client_cert(self, name: str) -> Path:
        """Certificate of the client named ``name``."""
        return self.ca_dir / f"client-{name}.pem"

    def client_key(self, name: str) -> Path:
        """Private key of the client named ``name``."""
        return self.ca_dir / f"client-{name}.key"

    def create_dirs(self) -> None:
        """Create every directory; those holding secrets are owner-only."""
        # All owner-only: the folder holds the database, object data, keys and PINs.
        for d in (
            self.home, self.s3_dir, self.db_dir, self.logs_dir, self.run_dir,
            self.ca_dir, self.softhsm_dir, self.secrets_dir,
        ):  # fmt: skip
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)


def ensure_secret(path: Path, nbytes: int = 20) -> str:
    """Return the secret in ``path``, creating a random hex one (0600) when absent."""
    if path.exists():
        os.chmod(path, 0o600)
        value = path.read_text().strip()
        if value:
            return value
    value = secrets.token_hex(nbytes)
    write_private(path, f"{value}\n".encode())
    return value


def live_argv(pid: int) -> list[bytes] | None:
    """The command line of ``pid``, a live process of this user; None when it has exited,
    is a zombie, or belongs to another user (never a stack's, which runs as its user, and
    one ``down`` could not signal). ``[]`` without procfs (not Linux): only the signal
    probe answered, so the caller cannot tell whose it is.

    Callers check the command line against their own files: a pid file outlives its
    process, and its pid comes round again (``pid_max`` is 32768 here, and every thread
    takes one), maybe to another stack's or a test's server.
    """
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return None
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        return []
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        stat = (proc / "stat").read_text()
    except OSError:
        return None
    # A zombie has exited already; it only waits for its parent to reap it.
    fields = stat.rsplit(")", 1)[-1].split() if ")" in stat else []
    return None if fields[:1] == ["Z"] else argv


def port_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a server could listen on ``host:port`` now.

    With SO_REUSEADDR, as weed and gRPC bind: the connections of this stack's own
    previous run, lingering in TIME_WAIT for a minute after ``down``, do not count as
    taken (without it, every quick ``down`` and ``up`` moved both ports), a listener does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(default: int, exclude: set[int]) -> int:
    """``default`` when it is free, else a free ephemeral port not in ``exclude``."""
    if default not in exclude and port_free(default):
        return default
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
        if port not in exclude:
            return port
    raise OSError("no free TCP port on 127.0.0.1")


def find_pkcs11_module() -> str:
    """The SoftHSM2 module: ``MEDVAULT_PKCS11_MODULE`` if set, else the first that exists."""
    configured = os.environ.get("MEDVAULT_PKCS11_MODULE")
    if configured:
        return configured
    for candidate in DEFAULT_MODULE_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    return DEFAULT_MODULE_CANDIDATES[0]  # the service then names the missing file


def _stamp_path(layout: StackLayout) -> Path:
    return layout.run_dir / "config.toml.sha256"


def write_config(
    layout: StackLayout, service_port: int, s3_port: int, module: str, database_url: str = ""
) -> bool:
    """Create ``config.toml`` unless it exists; True when this call wrote it."""
    text = render_config(layout, service_port, s3_port, module, database_url)
    try:
        # Exclusive create: a concurrent writer, or an operator's file, always wins.
        fd = os.open(layout.config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    write_private(_stamp_path(layout), _digest(text).encode())
    return True


def config_unedited(layout: StackLayout) -> bool:
    """True when ``config.toml`` is still exactly what the stack generated."""
    try:
        return _stamp_path(layout).read_text().strip() == _digest(layout.config.read_text())
    except OSError:
        return False


def rewrite_ports(
    layout: StackLayout, service_port: int, s3_port: int, module: str, database_url: str = ""
) -> bool:
    """Regenerate an unedited ``config.toml`` with new ports; False if it was edited."""
    if not config_unedited(layout):
        return False
    text = render_config(layout, service_port, s3_port, module, database_url)
    write_private(layout.config, text.encode())
    write_private(_stamp_path(layout), _digest(text).encode())
    return True


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def render_config(
    layout: StackLayout, service_port: int, s3_port: int, module: str, database_url: str = ""
) -> str:
    """The initial ``config.toml``: paths relative to the home, ports as chosen.

    ``database_url`` replaces the home's SQLite file (the cluster topology's PostgreSQL).
    """
    # Environment names are emptied on purpose: a MEDVAULT_PIN exported for another
    # token must not override this stack's PIN file.
    return f"""\
# medvault local stack, written by `medvault stack up`. Edit freely: it is never
# overwritten. Relative paths are resolved against this file's directory.

[server]
listen = "{LOOPBACK}:{service_port}"
max_record_size = 4294967296
chunk_size = 1048576

[tls]
enabled = true
cert = "ca/server.pem"
key = "ca/server.key"
client_ca = "ca/ca.pem"

[s3]
endpoint = "{LOOPBACK}:{s3_port}"
secure = false
bucket = "medvault-records"
access_key_env = ""
secret_key_env = ""
access_key_file = "secrets/s3-access-key"
secret_key_file = "secrets/s3-secret-key"

[database]
url = {_toml_str(database_url or f"sqlite:///{layout.database.resolve()}")}

[keystore]
module = {_toml_str(module)}
token_label = "medvault"
pin_env = ""
pin_file = "secrets/pin"
softhsm2_conf = "softhsm/softhsm2.conf"

[signing]
trust_anchors = "ca/ca.pem"

[stats]
# The Ministry's facility code of this hospital in SDMX exports (docs/statistics.md);
# "DEV-LOCAL" marks a development stack's figures as such.
facility = "DEV-LOCAL"
time_zone = "Asia/Ho_Chi_Minh"
"""


def _toml_str(value: str) -> str:
    """A TOML basic string (JSON's escapes are a subset TOML accepts)."""
    return json.dumps(value, ensure_ascii=False)


def log_size(path: Path) -> int:
    """A log's size now (0 if absent): the offset to read a start-up's lines from."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def text_since(path: Path, offset: int) -> str:
    """What was appended to a log after ``offset`` (bounded: the tail of a start-up)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(1 << 20).decode(errors="replace")
    except OSError:
        return ""
