"""Plain fixed-width tables for the CLI, and the time and text forms they print.

Widths come from the header and the first ``sample`` rows; later rows are streamed with
those widths (longer cells truncated), so a long audit query prints in bounded memory.
Cells are made terminal-safe: control characters (an ANSI escape in a break-the-glass
reason, say) are shown escaped, never sent to the terminal.

On a terminal a table is fitted to its width (``COLUMNS`` overrides the size): the
columns a command names as ``shrink`` give up width in that order, each down to
``MIN_WIDTH``, so a command lists its free-text column last and that text stays readable.
Piped output is not cut to a width (only to ``max_widths``).
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from itertools import islice
from typing import TextIO

from google.protobuf.timestamp_pb2 import Timestamp

ELLIPSIS = "…"
GAP = "  "
MIN_WIDTH = 12  # a shrinking column keeps at least this (or its header)
SHORT_ID = 8  # hex digits kept of a 32-hex id by ``short_ids``
_HEX_ID = re.compile(r"(?<![0-9a-f])([0-9a-f]{8})[0-9a-f]{24}(?![0-9a-f])")


def short_ids(text: str) -> str:
    """``text`` with each 32-hex id (record, grant) cut to its first 8 digits and ``…``."""
    return _HEX_ID.sub(r"\1" + ELLIPSIS, text)


def terminal_width(out: TextIO) -> int | None:
    """The width to fit a table to when ``out`` is a terminal (``COLUMNS`` overrides its
    size, as ``shutil.get_terminal_size`` does); None for a pipe or a file."""
    try:
        return shutil.get_terminal_size().columns if out.isatty() else None
    except (AttributeError, ValueError, OSError):
        return None


def fit(
    widths: Sequence[int], headers: Sequence[str], width: int, shrink: Sequence[int]
) -> list[int]:
    """``widths`` narrowed to ``width`` in total (with gaps), taking from ``shrink`` in order."""
    fitted = list(widths)
    excess = sum(fitted) + len(GAP) * (len(fitted) - 1) - width
    for i in shrink:
        if excess <= 0:
            break
        floor = min(fitted[i], max(MIN_WIDTH, len(headers[i])))
        cut = min(excess, fitted[i] - floor)
        fitted[i] -= cut
        excess -= cut
    return fitted


def clean(value: object) -> str:
    """``value`` as one terminal-safe line: control characters escaped (``\\x1b``)."""
    text = "" if value is None else str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


def truncate(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, the last one an ellipsis when cut."""
    if width < 1:
        return ""
    return text if len(text) <= width else text[: width - 1] + ELLIPSIS


def utc(value: Timestamp | datetime | None) -> str:
    """UTC ISO-8601 to the second with ``Z``; ``-`` when unset."""
    if value is None:
        return "-"
    if isinstance(value, Timestamp):
        if not value.seconds and not value.nanos:
            return "-"
        value = value.ToDatetime(tzinfo=UTC)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fit(cells: Sequence[str], widths: Sequence[int], numeric: frozenset[int]) -> str:
    parts = []
    for i, (cell, width) in enumerate(zip(cells, widths, strict=True)):
        text = truncate(cell, width)
        parts.append(text.rjust(width) if i in numeric else text.ljust(width))
    return GAP.join(parts).rstrip()


def render(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    max_widths: Mapping[int, int] | None = None,
    numeric: Iterable[int] = (),
    sample: int = 500,
    width: int | None = None,
    shrink: Sequence[int] = (),
) -> Iterator[str]:
    """The lines of a table: header, rule, rows. Columns in ``numeric`` align right;
    with ``width``, the ``shrink`` columns narrow (in that order) to fit it."""
    limits = dict(max_widths or {})
    right = frozenset(numeric)
    iterator = iter(rows)
    first = [[clean(cell) for cell in row] for row in islice(iterator, sample)]
    widths = [len(h) for h in headers]
    for row in first:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells for {len(headers)} columns")
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    widths = [min(w, limits.get(i, w)) for i, w in enumerate(widths)]
    if width is not None:
        widths = fit(widths, headers, width, shrink)
    yield _fit(headers, widths, right)
    yield GAP.join("-" * w for w in widths)
    for row in first:
        yield _fit(row, widths, right)
    for rest in iterator:
        yield _fit([clean(cell) for cell in rest], widths, right)


def print_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    max_widths: Mapping[int, int] | None = None,
    numeric: Iterable[int] = (),
    out: TextIO | None = None,
    shrink: Sequence[int] = (),
) -> int:
    """Print a table to ``out`` (stdout), fitted to its width; the number of rows printed."""
    stream = out if out is not None else sys.stdout
    count = -2  # header and rule
    lines = render(
        headers, rows, max_widths=max_widths, numeric=numeric,
        width=terminal_width(stream), shrink=shrink,
    )  # fmt: skip
    for line in lines:
        print(line, file=stream)
        count += 1
    return count
