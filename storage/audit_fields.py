"""Normalising an audit entry so that any event can be written (docs/audit.md).

Every text field of an :class:`~storage.audit_model.AuditEntry` may carry what a caller
sent: a 300-character record id, a JWT subject, a certificate CN, a role list. One such
value must never make a database refuse the batch it was committed with (PostgreSQL
refuses NUL and over-long ``VARCHAR`` values; no driver encodes a lone surrogate), nor
forge lines or terminal escapes in the officer's tables and exports. So before an
entry is queued, :func:`normalise` makes each field storable:

- control characters (C0, DEL, C1), lone surrogates, line/paragraph separators and
  bidirectional overrides are written as text escapes: ``\\x00`` (code points up to
  0xFF) or ``\\u202e`` (others). NUL becomes ``\\x00`` like any other control.
- a value longer than its column is cut and ends with a visible marker
  ``…[truncated, N chars]`` (N is the original length), the whole within the width;
  an escape is never cut in half.

The result is what the chain hashes and what the table stores: an event is recorded
as normalised, never rejected. The escapes are for reading, not a reversible encoding
(a caller could send the six characters ``\\x00`` themselves); values that needed no
change, which is every value medvault itself produces, are returned unchanged.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Final

from storage.audit_model import AuditEntry

# Column widths of ``audit_events`` (storage/audit_sql.py); ``reason`` is TEXT but is
# bounded too, so that no event (or export line) is megabytes long.
FIELD_WIDTHS: Final = {
    "principal": 255,
    "application": 255,
    "role": 64,
    "action": 64,
    "resource": 255,
    "status": 32,
    "source": 255,
    "reason": 2000,
}
TRUNCATION_MARK: Final = "…[truncated, {length} chars]"

_ESCAPED = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def normalise_text(value: str, width: int) -> str:
    """``value`` with unsafe characters escaped and cut to ``width`` with a marker."""
    if len(value) <= width and _ESCAPED.search(value) is None:
        return value  # the common case: nothing to do
    # Each input character yields at least one output character, so nothing past
    # ``width`` input characters can be kept: bound the work for huge values.
    pieces = [_escape(c) if _ESCAPED.match(c) else c for c in value[: width + 1]]
    if sum(map(len, pieces)) <= width and len(value) <= width:
        return "".join(pieces)
    mark = TRUNCATION_MARK.format(length=len(value))[:width]
    room = width - len(mark)
    kept: list[str] = []
    for piece in pieces:
        if len(piece) > room:
            break  # a whole escape or nothing: never half of one
        kept.append(piece)
        room -= len(piece)
    return "".join(kept) + mark


def normalise(entry: AuditEntry) -> AuditEntry:
    """``entry`` with every field storable (see the module docstring); idempotent."""
    changes: dict[str, Any] = {
        name: fixed
        for name, width in FIELD_WIDTHS.items()
        if (fixed := normalise_text(getattr(entry, name), width)) != getattr(entry, name)
    }
    return replace(entry, **changes) if changes else entry
