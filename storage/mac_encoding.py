"""Unambiguous byte encodings of row fields, for the MACs that authenticate rows.

A MAC is over one byte string; the fields it covers are joined so that no two rows
give the same bytes: each field is length-prefixed (4 bytes, big-endian), and a time
is its microseconds since the Unix epoch as decimal text (``-1`` for none), so
one instant has one encoding whatever its zone. Used by ``storage.grant_seal`` (grant
rows) and ``storage.backup.run_seal`` (the scheduled-run ledger).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def time_field(value: datetime | None) -> bytes:
    """A time as it enters a MAC: microseconds since the epoch as decimal text (-1: none)."""
    if value is None:
        return b"-1"
    # An aware time from the epoch in UTC (from the epoch in its own zone, one instant
    # had one encoding per zone); a naive one is taken as UTC.
    delta = value - (_EPOCH if value.tzinfo is not None else _EPOCH.replace(tzinfo=None))
    return str((delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds).encode()


def length_prefixed(parts: Iterable[bytes]) -> bytes:
    """Each part preceded by its length (4 bytes, big-endian), concatenated."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)
