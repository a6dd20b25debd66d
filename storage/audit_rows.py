"""Reading ``audit_events`` rows back: a row is data a database writer may have forged.

Every field is checked for the type and form the audit writer stores (sequence an
integer, time a timestamp, text fields strings, ``outcome`` one of ``OUTCOMES``,
``patient_index`` null or 32 bytes, both hashes 32 bytes). A row that fails is not an
error: it becomes a ``ChainedEvent`` whose ``malformed`` names the failing fields (names
only, never values: they may be patient data) and whose entry and hashes are
placeholders (text that is not UTF-8 reads as ``storage.sqlite_text.Undecodable``
under the audit's ``text_as_read``, which no text check accepts). The chain walk
reports such a row as ``event altered`` at its place
(``storage.audit_verify``); listings leave it out and report it
(``service.audit.listing``). Values the driver cannot read arrive as markers no check
accepts: ``Undecodable`` text (SQLite), an ``Unloadable`` value (PostgreSQL,
``storage.pg_loads``).

``audit_checkpoints`` rows are read the same way (``to_checkpoint``: a placeholder
``Checkpoint`` naming its bad fields, which the walk reports as ``checkpoint altered``
and the checkpointer never signs over). The ``audit_head`` row has no placeholder: a
malformed head raises ``AuditHeadMalformedError``, an outage to the writer (no event
is chained onto a head it cannot read) and a verdict to verification.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from storage.audit_model import (
    CHECKPOINT_VERSIONS,
    GENESIS_HASH,
    HASH_SIZE,
    OUTCOMES,
    AuditEntry,
    ChainedEvent,
    Checkpoint,
    Outcome,
)
from storage.errors import BackendUnavailableError

TEXT_FIELDS: Final = (
    "principal", "application", "role", "action", "resource", "status", "reason", "source",
)  # fmt: skip
# What a malformed row holds in place of its content: never hashed, never shown.
UNREADABLE: Final = AuditEntry(
    time=datetime(1970, 1, 1, tzinfo=UTC), principal="", action="", resource="", outcome="failed"
)

# The dialect's own parser of stored timestamps (SQLite keeps text), or None when the
# driver returns datetimes itself (PostgreSQL: psycopg's, or ``pg_loads.UNLOADABLE``).
TimeParser = Callable[[Any], Any] | None
# Longer than any signature or public key the audit key makes (RSA-4096 or EC): a
# longer value is not one the service stored.
MAX_SIGNED_BLOB: Final = 4096


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


def _position(value: object) -> int:
    """A checkpoint's or the head's sequence: an integer that fits the signed 8 bytes."""
    if type(value) is not int or not 0 <= value < 1 << 63:
        raise ValueError
    return value


def _blob(value: object) -> bytes:
    """A signature or key: 1 to MAX_SIGNED_BLOB bytes."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError
    data = bytes(value)
    if not 0 < len(data) <= MAX_SIGNED_BLOB:
        raise ValueError
    return data


def _version(value: object) -> int:
    if type(value) is not int or value not in CHECKPOINT_VERSIONS:
        raise ValueError
    return value


def _reader(m: Mapping[str, Any], bad: list[str]) -> Callable[[str, Callable[[Any], Any]], Any]:
    """``read(name, check)``: the checked value of field ``name``, or None (then named)."""

    def read(name: str, check: Callable[[Any], Any]) -> Any:
        try:
            return check(m[name])
        except (TypeError, ValueError, OverflowError):
            bad.append(name)
            return None

    return read


def to_event(m: Mapping[str, Any], parse_time: TimeParser) -> ChainedEvent:
    """The event a row holds, or a placeholder naming the fields that are malformed."""
    bad: list[str] = []
    read = _reader(m, bad)
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


def to_checkpoint(m: Mapping[str, Any], parse_time: TimeParser) -> Checkpoint:
    """The checkpoint a row holds, or a placeholder whose ``malformed`` names bad fields.

    Version 1 rows hold NULL in ``prev_sequence`` and ``prev_digest``; version 2 rows
    must hold an integer and 32 bytes there.
    """
    bad: list[str] = []
    read = _reader(m, bad)
    sequence = read("sequence", _position)
    hash_ = read("hash", _binary)
    signature = read("signature", _blob)
    key_label = read("key_label", _text)
    public_key = read("public_key_der", _blob)
    created_at = read("created_at", lambda v: _time(v, parse_time))
    version = read("version", _version)
    v2 = version != 1  # an unreadable version: its links must still be well formed
    prev_sequence = read("prev_sequence", lambda v: _position(v) if v2 or v is not None else 0)
    prev_digest = read("prev_digest", lambda v: _binary(v, nullable=not v2) or GENESIS_HASH)
    if bad:
        return Checkpoint(
            sequence if sequence is not None else 0, GENESIS_HASH, b"", "", b"",
            UNREADABLE.time, malformed=tuple(bad),
        )  # fmt: skip
    return Checkpoint(
        sequence, hash_, signature, key_label, public_key, created_at,
        version, prev_sequence, prev_digest,
    )  # fmt: skip


class AuditHeadMalformedError(BackendUnavailableError):
    """The ``audit_head`` row holds a value the writer never stores (a database
    writer's edit). The writer fails closed on it as on an outage; verification reports
    it. The message and ``fields`` name fields only, never values."""

    def __init__(self, fields: tuple[str, ...], sequence: int | None) -> None:
        self.fields = fields
        self.sequence = sequence  # None when the sequence itself is unreadable
        super().__init__(
            f"audit head row malformed ({', '.join(fields)}); run `medvault audit verify`"
        )


def read_head(sequence: object, hash_: object) -> tuple[int, bytes]:
    """The head's sequence and hash, checked as strictly as an event's."""
    bad: list[str] = []
    read = _reader({"sequence": sequence, "hash": hash_}, bad)
    checked = read("sequence", _position), read("hash", _binary)
    if bad:
        raise AuditHeadMalformedError(tuple(bad), checked[0])
    return checked[0], checked[1]
