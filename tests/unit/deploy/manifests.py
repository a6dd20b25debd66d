"""What the deployment tests share: the files in deploy/, the CLI and the config schema."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml

from service.cli.health_cmd import probe_parser
from service.cli.main import parser
from service.config import Config

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"

# Configuration values that name a file or folder the service opens (the module too).
PATH_FIELDS = (
    ("server", "policy"), ("tls", "cert"), ("tls", "key"), ("tls", "client_ca"),
    ("tls", "crl"), ("s3", "ca_file"), ("s3", "access_key_file"), ("s3", "secret_key_file"),
    ("keystore", "module"), ("keystore", "pin_file"), ("keystore", "softhsm2_conf"),
    ("signing", "trust_anchors"), ("signing", "chain"), ("backup", "ca_file"),
    ("backup", "access_key_file"), ("backup", "secret_key_file"), ("audit", "witness_file"),
)  # fmt: skip

# libpq's own environment variables (PostgreSQL docs, "Environment Variables"): the
# driver reads them, so a password never sits in database.url.
LIBPQ_ENV = frozenset({"PGPASSFILE", "PGPASSWORD", "PGSSLMODE", "PGSSLROOTCERT",
                       "PGSSLCERT", "PGSSLKEY", "PGCONNECT_TIMEOUT", "PGAPPNAME"})  # fmt: skip


def image_files() -> set[str]:
    """Files the image itself holds at a fixed path (COPY lines of the Dockerfile)."""
    found = set()
    for line in (DEPLOY / "docker" / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not words[1].startswith("--") and len(words) == 3:
            found.add(words[2])
    return found


def load_yaml(path: Path) -> list[Any]:
    """Every document of a YAML file (safe loader)."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def config_paths(config: Config) -> dict[str, str]:
    """``section.key`` -> path for every path-valued setting that is set."""
    found = {}
    for section, key in PATH_FIELDS:
        value = getattr(getattr(config, section), key)
        if value:
            found[f"{section}.{key}"] = value
    return found


def env_read_by_service(config: Config) -> set[str]:
    """Environment variables the service or its CLI reads, or the config names.

    A name counts when it is a string literal in the service's own source (so a renamed
    variable fails here), when the configuration names it (PIN, S3 keys), or when it is
    libpq's.
    """
    named = {config.keystore.pin_env, config.s3.access_key_env, config.s3.secret_key_env}
    literals: set[str] = set()
    for package in ("service", "storage", "keystore"):
        for source in (ROOT / package).rglob("*.py"):
            literals |= set(re.findall(r"[\"']([A-Z][A-Z0-9_]{3,})[\"']", source.read_text()))
    return (named - {""}) | {n for n in literals if n.startswith("MEDVAULT_")} | LIBPQ_ENV


def cli_args(argv: list[str]) -> Any:
    """``argv`` (after ``medvault``) parsed by the real CLI parser; SystemExit if unknown."""
    return parser().parse_args(argv)


PROBE_MODULE = ["python", "-m", "service.cli.health_cmd"]


def probe_args(command: list[str]) -> Any:
    """A health probe's command parsed: ``medvault health ...`` or the module alone."""
    if command[: len(PROBE_MODULE)] == PROBE_MODULE:
        return probe_parser().parse_args(command[len(PROBE_MODULE) :])
    assert command[0] == "medvault", command
    args = cli_args(command[1:])
    assert args.command == "health", command
    return args


def assert_production(config: Config) -> None:
    """What a production config must have: mutual TLS, audit, PostgreSQL without a
    password in the URL, a write-once witness, and no test-only switch."""
    assert config.tls.enabled
    assert config.audit.enabled
    assert config.audit.witness_bucket or config.audit.witness_file
    assert config.database.url.startswith("postgresql+psycopg://")
    assert sa.make_url(config.database.url).password is None  # libpq's env or file
    assert not config.backup.schedule_seconds
    assert not config.backup.drill_schedule_seconds
    assert config.backup.schedule
    assert config.server.listen.startswith("0.0.0.0:")


def under(path: str, folders: set[str]) -> bool:
    """Whether ``path`` is one of ``folders`` or inside one."""
    return any(path == f or path.startswith(f.rstrip("/") + "/") for f in folders)
