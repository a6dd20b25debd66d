"""Audit events pinned against the canonical encoding as ``json.dumps`` made it.

Events as callers and database writers could leave them (quotes, backslashes, raw
controls written before normalisation, astral and combining characters, the longest
values, years before 1000 and near 9999, odd zones), each with the first 16 hex digits of
the SHA-256 of its encoding at its sequence, and the chain's head: all computed with
``canonical_bytes`` of commit 252fa3f (``json.dumps`` of the document, ``strftime`` for
the time), before the encoding was written key by key. Every chain written before must
still verify.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from storage.audit_model import AuditEntry

IST = timezone(timedelta(hours=5, minutes=30))
WEST = timezone(-timedelta(hours=9, minutes=59, seconds=59, microseconds=1))
EMPTY = ("principal", "action", "resource", "role", "application", "status", "reason", "source")
OLD_CHAIN: tuple[tuple[dict[str, Any], str], ...] = (
    ({}, "2374774fb2339938"),
    (
        {
            "principal": 'q"uo\\te/</script>',
            "reason": "\\x00 escaped by normalise",
            "patient_index": bytes(range(32)),
        },
        "6186e3f7cdc62c4b",
    ),
    ({"reason": "\x00\x01\x1f\x7f\x85\u2028\u2029\u202e\ufeff"}, "9b330a53b2358ceb"),
    (
        {
            "principal": "\U0001f489\u0301e\u0301\uffff\U0010ffff",
            "role": "\u00e4rztin",
            "application": "\uff28\uff29\uff33",  # fullwidth HIS
        },
        "845542d840ffd9b8",
    ),
    (
        {"reason": "r" * 2000 + "\u2026[truncated, 9999 chars]", "resource": "x" * 255},
        "7484cc1feb21f448",
    ),
    ({"time": datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)}, "05427f37d8c7caf7"),
    ({"time": datetime(1000, 1, 1, tzinfo=UTC), "outcome": "denied"}, "32900ef1796a66f2"),
    ({"time": datetime(1, 1, 1, 5, 30, tzinfo=IST), "outcome": "failed"}, "eaf13a24309aa9d4"),
    ({"time": datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)}, "32170753f6508be2"),
    (
        {"time": datetime(2026, 3, 29, 1, tzinfo=WEST), "status": "", "source": "[::1]:5"},
        "f45bdff2ec4b83d0",
    ),
    (dict.fromkeys(EMPTY, ""), "9a53597f1bfc236d"),
)
OLD_HEAD = "4405d1987426ee1124f29cb47a6bd76af1da5d86283b6baa5f9022863cdb5f4b"


def old_chain() -> list[AuditEntry]:
    """The events of ``OLD_CHAIN`` (sequence 1, 2, ...)."""
    base: dict[str, Any] = {
        "time": datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        "principal": "dr",
        "action": "GetRecord",
        "resource": "rec",
        "outcome": "allowed",
    }
    return [AuditEntry(**{**base, **fields}) for fields, _ in OLD_CHAIN]
