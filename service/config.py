"""Service configuration: one TOML file parsed once at start-up into frozen dataclasses.

Unknown sections and keys are rejected (a typo must not silently fall back to a
default). Relative paths are resolved against the config file's directory. Secrets are
never in the file itself: it names environment variables or files that hold them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import typing
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from service.config_sections import (
    MAX_IDLE_SECONDS,
    MAX_MLLP_FRAME,
    MAX_PROCESSES,
    AuditConfig,
    BackupConfig,
    Config,
    ConfigError,
    DatabaseConfig,
    DicomConfig,
    KeystoreConfig,
    MllpConfig,
    S3Config,
    ServerConfig,
    SigningConfig,
    StatsConfig,
    TlsConfig,
)

__all__ = [
    "CREDENTIALS_PREFIX",
    "MAX_IDLE_SECONDS",
    "MAX_MLLP_FRAME",
    "MAX_PROCESSES",
    "AuditConfig",
    "BackupConfig",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "DicomConfig",
    "KeystoreConfig",
    "MllpConfig",
    "S3Config",
    "ServerConfig",
    "SigningConfig",
    "StatsConfig",
    "TlsConfig",
    "load",
    "parse",
    "read_secret",
]

_PATH_KEYS = {
    ("tls", "cert"),
    ("tls", "key"),
    ("tls", "client_ca"),
    ("tls", "crl"),
    ("s3", "ca_file"),
    ("s3", "access_key_file"),
    ("s3", "secret_key_file"),
    ("keystore", "pin_file"),
    ("keystore", "softhsm2_conf"),
    ("server", "policy"),
    ("signing", "trust_anchors"),
    ("signing", "chain"),
    ("backup", "ca_file"),
    ("backup", "access_key_file"),
    ("backup", "secret_key_file"),
    ("backup", "directory"),
    ("audit", "witness_file"),
    ("dicom", "spool_directory"),
}


# A path key may start with this: systemd's credentials folder of the unit (LoadCredential=,
# docs/deployment.md). Its location depends on the unit's name (an instance of a template
# unit has its own), so a config shared by instances names the variable, not the folder.
CREDENTIALS_PREFIX = "$CREDENTIALS_DIRECTORY/"


def _resolve_path(section: str, key: str, value: str, base_dir: Path) -> str:
    """A path key's value: relative to the config file, or in systemd's credentials folder."""
    if not value.startswith(CREDENTIALS_PREFIX):
        return str(base_dir / value)
    folder = os.environ.get("CREDENTIALS_DIRECTORY", "")
    if not folder:
        raise ConfigError(
            f"[{section}] {key} names $CREDENTIALS_DIRECTORY, which is not set: systemd sets "
            "it for a unit with LoadCredential=; elsewhere name the file itself"
        )
    return str(Path(folder) / value.removeprefix(CREDENTIALS_PREFIX))


def _section(cls: type[Any], name: str, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    # TOML writes 60 for a float setting; accept an integer where a float is expected.
    raw = {k: float(v) if hints.get(k) is float and type(v) is int else v for k, v in raw.items()}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"[{name}] unknown key {key!r}; known: {', '.join(sorted(fields))}")
        expected = hints[key]
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if not ok:
            raise ConfigError(f"[{name}] {key} must be {getattr(expected, '__name__', expected)}")
    return cls(**raw)


def _check(config: Config) -> None:
    _check_server(config.server)
    if config.keystore.pool_size <= 0:
        raise ConfigError("keystore.pool_size must be positive")
    if not 5 << 20 <= config.s3.part_size <= 5 << 30:
        raise ConfigError("s3.part_size must be between 5 MiB and 5 GiB (S3 multipart limits)")
    if config.tls.enabled and not (config.tls.cert and config.tls.key and config.tls.client_ca):
        raise ConfigError("[tls] cert, key and client_ca are required when tls.enabled is true")
    _check_audit(config.audit)
    _check_backup(config.backup)
    _check_stats(config.stats)
    _check_mllp(config.mllp, tls_enabled=config.tls.enabled)
    _check_dicom(config)
    if not config.database.url:
        raise ConfigError("[database] url is required")


def _check_server(server: ServerConfig) -> None:
    positive = (
        "max_record_size", "request_id_retention_hours", "chunk_size", "workers",
        "first_message_seconds", "idle_seconds", "refusal_summary_seconds",
        "max_concurrent_rpcs", "max_streams_per_connection", "keepalive_seconds",
        "keepalive_timeout_seconds", "max_connection_idle_seconds",
    )  # fmt: skip
    for key in positive:
        if getattr(server, key) <= 0:
            raise ConfigError(f"server.{key} must be positive")
    if max(server.first_message_seconds, server.idle_seconds) > MAX_IDLE_SECONDS:
        raise ConfigError(
            f"server.first_message_seconds and idle_seconds must be at most {MAX_IDLE_SECONDS:g}"
        )
    if not 0 <= server.processes <= MAX_PROCESSES:
        raise ConfigError(
            f"server.processes must be 0 (one per core) or a count from 1 to {MAX_PROCESSES}"
        )
    if server.min_upload_bytes_per_second < 0:
        raise ConfigError("server.min_upload_bytes_per_second must be 0 (off) or more")
    if server.orphan_sweep_seconds < 0:
        raise ConfigError("server.orphan_sweep_seconds must be 0 (default) or more")
    if min(server.max_calls_per_principal, server.max_calls_per_application) < 0:
        raise ConfigError("server.max_calls_per_principal/application must be 0 (default) or more")
    if not 0 <= server.max_uploads < 2 * server.workers:
        raise ConfigError(
            "server.max_uploads must be 0 (default: workers) up to 2 x workers - 1, "
            "so that reads always find a thread"
        )
    if server.chunk_size > 3 << 20:
        raise ConfigError("server.chunk_size must be at most 3 MiB (gRPC's 4 MiB message limit)")


def _check_mllp(mllp: MllpConfig, *, tls_enabled: bool) -> None:
    if not mllp.listen:
        return
    if not tls_enabled:
        raise ConfigError(
            "[mllp] needs [tls] enabled: MLLP is served only on TLS with client certificates"
        )
    if not 1024 <= mllp.max_frame_bytes <= MAX_MLLP_FRAME:
        raise ConfigError(f"mllp.max_frame_bytes must be between 1024 and {MAX_MLLP_FRAME}")
    if not 0 < mllp.idle_seconds <= 3600:
        raise ConfigError("mllp.idle_seconds must be positive and at most 3600")
    if min(mllp.max_connections, mllp.max_connections_per_principal) <= 0:
        raise ConfigError("mllp.max_connections and max_connections_per_principal must be positive")
    if mllp.authority not in {"oid", "namespace"}:
        raise ConfigError('mllp.authority must be "oid" or "namespace"')


def _check_audit(audit: AuditConfig) -> None:
    if audit.witness_lock_mode not in {"COMPLIANCE", "GOVERNANCE"}:
        raise ConfigError("audit.witness_lock_mode must be COMPLIANCE or GOVERNANCE")
    if audit.witness_lock_days < 0:
        raise ConfigError("audit.witness_lock_days must be 0 (no Object Lock) or more")
    if not 0 < audit.revocation_refresh_seconds <= audit.revocation_stale_seconds <= 86400:
        raise ConfigError(
            "audit.revocation_refresh_seconds must be positive and at most "
            "audit.revocation_stale_seconds, itself at most 86400"
        )


def _check_backup(backup: BackupConfig) -> None:
    if not 1 <= backup.workers <= 64:
        raise ConfigError("backup.workers must be from 1 to 64")
    c = backup.drill_sample_confidence
    if c != 0 and not 0.5 <= c < 1:  # NaN fails too
        raise ConfigError("backup.drill_sample_confidence must be 0 (full drills) or from 0.5 "
                          "to below 1, e.g. 0.99")  # fmt: skip
    if not 1e-6 <= backup.drill_max_defect_rate < 1:
        raise ConfigError("backup.drill_max_defect_rate must be from 0.000001 to below 1, "
                          "e.g. 0.01")  # fmt: skip


def _check_stats(stats: StatsConfig) -> None:
    # The code becomes an SDMX key value: the IDType characters, as the DSD declares.
    if stats.facility and not re.fullmatch(r"[A-Za-z0-9_@$-]{1,20}", stats.facility):
        raise ConfigError("stats.facility must be 1 to 20 letters, digits, _ @ $ or -")
    try:
        ZoneInfo(stats.time_zone)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ConfigError("stats.time_zone must be an IANA time zone, e.g. Asia/Ho_Chi_Minh") from e
    if stats.min_cell < 1:
        raise ConfigError("stats.min_cell must be at least 1")


def _check_dicom(config: Config) -> None:
    dicom = config.dicom
    title = dicom.ae_title
    if (
        not 1 <= len(title) <= 16
        or not title.isascii()
        or not title.isprintable()
        or ("\\" in title or not title.strip())
    ):
        raise ConfigError("dicom.ae_title must be 1 to 16 printable ASCII characters, no backslash")
    for key in ("max_instance_size", "max_associations", "network_timeout_seconds"):
        if getattr(dicom, key) <= 0:
            raise ConfigError(f"dicom.{key} must be positive")
    if not dicom.spool_directory.strip():
        raise ConfigError("dicom.spool_directory must name a folder of its own (emptied at start)")
    if not dicom.listen:
        return
    if not config.tls.enabled:
        raise ConfigError("[dicom] listen requires [tls] enabled: DICOM is served over TLS only")
    host, sep, port = dicom.listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError("dicom.listen must be host:port")


def parse(raw: dict[str, Any], base_dir: Path) -> Config:
    """Build a ``Config`` from parsed TOML; ``ConfigError`` names the offending key."""
    sections: dict[str, Any] = {}
    hints = typing.get_type_hints(Config)
    for name, value in raw.items():
        cls = hints.get(name)
        if name == "base_dir" or not isinstance(cls, type):
            raise ConfigError(f"unknown section [{name}]")
        if isinstance(value, dict):
            value = {  # noqa: PLW2901  (relative paths resolved in place)
                k: _resolve_path(name, k, v, base_dir)
                if (name, k) in _PATH_KEYS and isinstance(v, str) and v
                else v
                for k, v in value.items()
            }
        sections[name] = _section(cls, name, value)
    config = Config(**sections, base_dir=base_dir)
    _check(config)
    return config


def load(path: str | os.PathLike[str]) -> Config:
    """Read and parse the config file at ``path``."""
    file = Path(path)
    try:
        raw = tomllib.loads(file.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"config file {file} not found (run `medvault stack up`)") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {file} is not valid TOML: {e}") from e
    return parse(raw, file.resolve().parent)


def read_secret(env: str, file: str) -> str:
    """A secret from the environment variable ``env`` or else from ``file``."""
    if env and os.environ.get(env):
        return os.environ[env]
    if file:
        try:
            return Path(file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read secret file {file}: {e.strerror}") from e
    raise ConfigError(f"secret missing: set {env} or configure a file")
