"""Argument types and flags shared by the access and audit commands."""

from __future__ import annotations

import argparse
import os
import re
from datetime import UTC, datetime, timedelta

from service._gen.medvault.v1 import records_pb2

_RELATIVE = re.compile(r"^(\d+)([mhd])\Z")
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """An ISO-8601 time (UTC when it names no zone) or a span back from now: 30m, 24h, 7d."""
    match = _RELATIVE.match(text.strip())
    if match:
        span = timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        return (now or datetime.now(UTC)) - span
    return parse_iso(text)


def parse_iso(text: str) -> datetime:
    """An ISO-8601 time; UTC when it names no zone."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected an ISO-8601 time such as 2026-01-31T08:00"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer of at least 0 (a limit where 0 means none)."""
    return _int_at_least(text, 0)


def add_patient_flags(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """``--patient ID`` and ``--authority A`` (default $MEDVAULT_AUTHORITY)."""
    parser.add_argument("--patient", required=required, help="patient identifier")
    add_authority_flag(parser)


def add_authority_flag(parser: argparse.ArgumentParser) -> None:
    """``--authority A``: the assigning authority of ``--patient``."""
    parser.add_argument(
        "--authority",
        default=os.environ.get("MEDVAULT_AUTHORITY"),
        help="assigning authority of the patient identifier (default $MEDVAULT_AUTHORITY)",
    )


def patient_id(ns: argparse.Namespace) -> records_pb2.PatientId | None:
    """The ``--patient``/``--authority`` pair, None without ``--patient``."""
    if not getattr(ns, "patient", None):
        return None
    if not ns.authority:
        raise SystemExit("medvault: --patient needs --authority (or MEDVAULT_AUTHORITY)")
    return records_pb2.PatientId(id=ns.patient, assigning_authority=ns.authority)


def add_time_flags(parser: argparse.ArgumentParser, *, until: bool = True) -> None:
    """``--since`` (and ``--until``): ISO-8601 or a span back from now."""
    parser.add_argument(
        "--since", type=parse_when,
        help="from this time: ISO-8601 (UTC unless it names a zone) or a span back from now "
        "such as 30m, 24h, 7d",
    )  # fmt: skip
    if until:
        parser.add_argument(
            "--until", type=parse_when, help="up to this time: ISO-8601 or a span (24h, 7d)"
        )


def config_path(ns: argparse.Namespace) -> str:
    """The config file: ``--config``, else ``$MEDVAULT_HOME/config.toml`` (``.medvault``)."""
    home = os.environ.get("MEDVAULT_HOME", ".medvault")
    return str(getattr(ns, "config", None) or os.path.join(home, "config.toml"))
