"""Audit-trail domain objects and the byte encodings the hash chain and signatures cover.

Canonical encoding of an event (the input of its hash)::

    UTF-8 JSON, keys sorted, no whitespace (separators "," and ":"), non-ASCII kept
    as UTF-8 (not \\u-escaped), of exactly these keys:
      sequence       integer, 1, 2, 3 ...
      time           ISO-8601 UTC with microseconds, "2026-01-02T03:04:05.000006Z"
      principal, application, role, action, resource, outcome, status, reason,
      source         strings ("" when absent)
      patient_index  lowercase hex of the 32-byte blind index, or null

    hash = SHA-256(prev_hash || canonical)      prev_hash of event 1 = 32 zero bytes

Checkpoint message (the bytes the audit key signs), version 2 (every new checkpoint)::

    b"medvault.audit.checkpoint.v2" || sequence (8 bytes, big-endian) || hash (32 bytes)
        || previous checkpoint's sequence (8 bytes) || previous checkpoint's digest (32)

    digest of a checkpoint = SHA-256(its signed message)
    the first checkpoint's previous sequence is 0 and its previous digest 32 zero bytes

so the checkpoints form a chain of their own: deleting one breaks its successor's
link. Version 1 (checkpoints written before the chain existed, still verified)::

    b"medvault.audit.checkpoint.v1" || sequence as 8-byte big-endian || hash (32 bytes)

The prefix separates checkpoint signatures from anything else a key might sign.
``docs/audit.md`` describes the same, for verifiers outside medvault.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

HASH_SIZE: Final = 32
GENESIS_HASH: Final = bytes(HASH_SIZE)
CHECKPOINT_PREFIX: Final = b"medvault.audit.checkpoint.v1"
CHECKPOINT_PREFIX_V2: Final = b"medvault.audit.checkpoint.v2"
CHECKPOINT_VERSIONS: Final = (1, 2)
OUTCOMES: Final = ("allowed", "denied", "failed")
# json.dumps's own string escaper when ensure_ascii=False (C, like json.dumps's encoder).
_quote: Final = json.encoder.encode_basestring

Outcome = Literal["allowed", "denied", "failed"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEntry:
    """What happened, before it has a place in the chain (no patient data in clear)."""

    time: datetime
    principal: str
    action: str
    resource: str
    outcome: Outcome
    role: str = ""
    application: str = ""
    patient_index: bytes | None = None
    status: str = ""
    reason: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if self.time.tzinfo is None:
            raise ValueError("audit time must carry a time zone")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"audit outcome must be one of {', '.join(OUTCOMES)}")
        if self.patient_index is not None and len(self.patient_index) != HASH_SIZE:
            raise ValueError("patient_index must be a 32-byte blind index")


@dataclass(frozen=True, slots=True)
class ChainedEvent:
    """An entry at its place in the chain: sequence number and the two hashes.

    ``malformed`` names the fields of a stored row that hold no value the writer stores
    (a database writer's edit): the entry and hashes are then placeholders, and the
    chain walk reports the row as altered (``storage.audit_rows``).
    """

    sequence: int
    entry: AuditEntry
    prev_hash: bytes
    hash: bytes
    malformed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement that the chain's head was ``hash`` at ``sequence``.

    Version 2 also signs the previous checkpoint's sequence and digest; version 1 (the
    defaults) signs no predecessor. ``malformed`` names the fields of a stored row that
    hold no value the service stores: the rest are then placeholders, and verification
    reports the checkpoint as altered (``storage.audit_rows``).
    """

    sequence: int
    hash: bytes
    signature: bytes
    key_label: str
    public_key_der: bytes
    created_at: datetime
    version: int = 1
    prev_sequence: int = 0
    prev_digest: bytes = GENESIS_HASH
    malformed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.version not in CHECKPOINT_VERSIONS:
            raise ValueError("unknown checkpoint version")
        if len(self.hash) != HASH_SIZE or len(self.prev_digest) != HASH_SIZE:
            raise ValueError("checkpoint hashes must be 32 bytes")


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of walking the chain; ``first_bad_sequence`` is None when ``ok``."""

    ok: bool
    events_checked: int
    checkpoints_checked: int
    first_bad_sequence: int | None
    reason: str
    last_checkpoint_sequence: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditFilter:
    """Which events a query returns; every field narrows, None means any."""

    since: datetime | None = None
    until: datetime | None = None
    principal: str | None = None
    patient_index: bytes | None = None
    action: str | None = None
    outcome: Outcome | None = None
    limit: int | None = None
    newest_first: bool = False


def format_time(value: datetime) -> str:
    """The canonical time text: UTC, microseconds, ``Z`` suffix."""
    t = value.astimezone(UTC)
    if t.year < 1000:  # strftime's %Y has no zero padding here (glibc): keep its text
        return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # The same text as that strftime, built without it (a third less CPU per event).
    return (
        f"{t.year}-{t.month:02}-{t.day:02}T{t.hour:02}:{t.minute:02}:{t.second:02}"
        f".{t.microsecond:06}Z"
    )


def event_document(sequence: int, entry: AuditEntry) -> dict[str, Any]:
    """The fields the chain hashes, in their canonical text forms (exports reuse it)."""
    return {
        "sequence": sequence,
        "time": format_time(entry.time),
        "principal": entry.principal,
        "application": entry.application,
        "role": entry.role,
        "action": entry.action,
        "resource": entry.resource,
        "patient_index": entry.patient_index.hex() if entry.patient_index is not None else None,
        "outcome": entry.outcome,
        "status": entry.status,
        "reason": entry.reason,
        "source": entry.source,
    }


def canonical_bytes(sequence: int, entry: AuditEntry) -> bytes:
    """The canonical encoding of an event (see the module docstring).

    Written key by key in sorted order, each string through the escaper ``json.dumps``
    itself uses with ``ensure_ascii=False``: the same bytes as ``json.dumps`` of
    ``event_document`` (``tests/unit/storage/test_audit_model.py`` compares the two), at
    a third of its CPU; the audit writer encodes every event it commits, and verification
    every event it reads. A field of another type than the entry declares (``json.dumps``
    would encode it, the escaper refuses it) takes ``json.dumps`` as before.
    """
    if type(sequence) is int:  # not a bool or an int subclass, which json spells apart
        try:
            return _written(sequence, entry)
        except TypeError:
            pass
    document = event_document(sequence, entry)
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def _written(sequence: int, e: AuditEntry) -> bytes:
    q = _quote
    index = "null" if e.patient_index is None else f'"{e.patient_index.hex()}"'
    return (
        f'{{"action":{q(e.action)},"application":{q(e.application)},"outcome":{q(e.outcome)},'
        f'"patient_index":{index},"principal":{q(e.principal)},"reason":{q(e.reason)},'
        f'"resource":{q(e.resource)},"role":{q(e.role)},"sequence":{sequence},'
        f'"source":{q(e.source)},"status":{q(e.status)},"time":{q(format_time(e.time))}}}'
    ).encode()


def chain_hash(prev_hash: bytes, sequence: int, entry: AuditEntry) -> bytes:
    """SHA-256(prev_hash || canonical encoding)."""
    return hashlib.sha256(prev_hash + canonical_bytes(sequence, entry)).digest()


def checkpoint_message(sequence: int, head_hash: bytes) -> bytes:
    """The bytes a version 1 checkpoint signature covers."""
    return CHECKPOINT_PREFIX + sequence.to_bytes(8, "big") + head_hash


def checkpoint_message_v2(
    sequence: int, head_hash: bytes, prev_sequence: int, prev_digest: bytes
) -> bytes:
    """The bytes a version 2 checkpoint signature covers (see the module docstring)."""
    return (
        CHECKPOINT_PREFIX_V2
        + sequence.to_bytes(8, "big")
        + head_hash
        + prev_sequence.to_bytes(8, "big")
        + prev_digest
    )


def signed_message(checkpoint: Checkpoint) -> bytes:
    """The bytes ``checkpoint``'s signature covers, by its version."""
    if checkpoint.version == 1:
        return checkpoint_message(checkpoint.sequence, checkpoint.hash)
    return checkpoint_message_v2(
        checkpoint.sequence, checkpoint.hash, checkpoint.prev_sequence, checkpoint.prev_digest
    )


def checkpoint_digest(checkpoint: Checkpoint) -> bytes:
    """SHA-256 of the signed message: what the next checkpoint names as its predecessor."""
    return hashlib.sha256(signed_message(checkpoint)).digest()
