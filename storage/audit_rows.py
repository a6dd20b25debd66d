"""Reading ``audit_events`` rows back: a row is data a database writer may have forged.

Every field is checked for the type and form the audit writer stores (sequence an
integer, time a timestamp, text fields strings, ``outcome`` one of ``OUTCOMES``,
``patient_index`` null or 32 bytes, both hashes 32 bytes). A row that fails is not an
error: it becomes a ``ChainedEvent`` whose ``malformed`` names the failing fields (names
only, never values: they may be patient data) and whose entry and hashes are
placeholders. The chain walk reports such a row as ``event altered`` at its place
(``storage.audit_verify``); listings skip it with a log line (``SqlAuditLog.query``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from storage.audit_model import HASH_SIZE, OUTCOMES, AuditEntry, ChainedEvent, Outcome

TEXT_FIELDS: Final = (
    "principal", "application", "role", "action", "resource", "status", "reason", "source",
)  # fmt: skip
# What a malformed row holds in place of its content: never hashed, never shown.
UNREADABLE: Final = AuditEntry(
    time=datetime(1970, 1, 1, tzinfo=UTC), principal="", action="", resource="", outcome="failed"
)

# The dialect's own parser of stored timestamps (SQLite keeps text), or None when the
# driver returns datetimes itself (PostgreSQL).
TimeParser = Callable[[Any], Any] | None


def _binary(value: object, *, nullable: bool = False) -> bytes | None:
    """32 bytes, or None when allowed; raises ValueError for anything else."""
    if value is None and nullable:
        return None
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError  # bytes(n) of an int would allocate n bytes: never call it
    data = bytes(value)
    if len(data) != HASH_SIZE:
        raise ValueError
    return data


def _time(value: object, parse: TimeParser) -> datetime:
    if isinstance(value, str) and parse is not None:
        value = parse(value)
    if not isinstance(value, datetime):
        raise TypeError
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _text(value: object) -> str:
    if type(value) is not str:
        raise ValueError
    return value


def _outcome(value: object) -> Outcome:
    if value not in OUTCOMES or type(value) is not str:
        raise ValueError
    return value


def _sequence(value: object) -> int:
    if type(value) is not int:
        raise ValueError
    return value


def to_event(m: Mapping[str, Any], parse_time: TimeParser) -> ChainedEvent:
    """The event a row holds, or a placeholder naming the fields that are malformed."""
    bad: list[str] = []

    def read(name: str, check: Callable[[Any], Any]) -> Any:
        try:
            return check(m[name])
        except (TypeError, ValueError, OverflowError):
            bad.append(name)
            return None

    sequence = read("sequence", _sequence)
    time = read("time", lambda v: _time(v, parse_time))
    texts = {name: read(name, _text) for name in TEXT_FIELDS}
    outcome = read("outcome", _outcome)
    index = read("patient_index", lambda v: _binary(v, nullable=True))
    prev_hash = read("prev_hash", _binary)
    hash_ = read("hash", _binary)
    if bad:
        return ChainedEvent(
            sequence if sequence is not None else 0, UNREADABLE,
            prev_hash or b"", hash_ or b"", malformed=tuple(bad),
        )  # fmt: skip
    entry = AuditEntry(time=time, outcome=outcome, patient_index=index, **texts)
    return ChainedEvent(sequence, entry, prev_hash, hash_)
