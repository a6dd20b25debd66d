"""Aggregate record counts for statistics (the SDMX-HD export, docs/statistics.md).

Only counts leave: no identifier, blind index, title, record id or time finer than the
month. Each counted row is verified first (``storage.row_auth``): its kind and its time
are trusted only once the row authenticates, so a database writer cannot move a record
to another kind or month unnoticed; a row that does not verify fails the whole count
(``RowTamperedError``, DATA_LOSS, and an incident), as a list page does.

Small cells are suppressed here, below the service, so a count under the threshold is
never in a reply: a suppressed cell carries no number.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, tzinfo
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy import Engine

from storage.errors import InvalidRecordError, RecordConflictError
from storage.model import RecordKind
from storage.row_auth import RowVerifier
from storage.sql_metadata import records, run_in_transaction, to_stored_record, to_utc

_MONTH = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])")
# Rows fetched per round trip while counting (a server-side cursor on PostgreSQL).
_BATCH = 500


class StatisticsNotConfiguredError(RecordConflictError):
    """No facility is configured: counts reported under no facility would be useless."""


@dataclass(frozen=True, slots=True)
class CountCell:
    """One kind's count; ``count`` is None when the cell is suppressed."""

    kind: RecordKind
    count: int | None

    @property
    def suppressed(self) -> bool:
        """True when the count was below the threshold and is withheld."""
        return self.count is None


@dataclass(frozen=True, slots=True)
class MonthlyCounts:
    """New records of one facility in one month, by kind (every kind, in enum order)."""

    period: str  # YYYY-MM
    facility: str
    time_zone: str
    min_cell: int
    cells: tuple[CountCell, ...]


def month_bounds(period: str, zone: tzinfo) -> tuple[datetime, datetime]:
    """The first instant of ``period`` (YYYY-MM) in ``zone`` and of the month after."""
    match = _MONTH.fullmatch(period)
    if match is None:
        raise InvalidRecordError("period", "must be a month as YYYY-MM, e.g. 2026-10")
    year, month = int(match[1]), int(match[2])
    if year < 1970:
        raise InvalidRecordError("period", "must be 1970-01 or later")
    after = (year + 1, 1) if month == 12 else (year, month + 1)
    return datetime(year, month, 1, tzinfo=zone), datetime(*after, 1, tzinfo=zone)


def suppress(counts: Counter[RecordKind], min_cell: int) -> tuple[CountCell, ...]:
    """Every kind's cell; counts from 1 to ``min_cell - 1`` withheld (zero is shown:
    it describes nobody)."""
    return tuple(
        CountCell(kind, None if 0 < counts[kind] < min_cell else counts[kind])
        for kind in RecordKind
    )


class RecordStatistics:
    """Counts of new records (first versions) per kind and month, de-identified."""

    def __init__(
        self, engine: Engine, verifier: RowVerifier, *, facility: str, time_zone: str,
        min_cell: int,
    ) -> None:  # fmt: skip
        if min_cell < 1:
            raise ValueError("min_cell must be at least 1")
        self._engine = engine
        self._verifier = verifier
        self._facility = facility
        self._zone_name = time_zone
        self._zone = ZoneInfo(time_zone)
        self._min_cell = min_cell

    def monthly(self, period: str) -> MonthlyCounts:
        """The suppressed counts of ``period`` (YYYY-MM, in the facility's time zone)."""
        start, end = month_bounds(period, self._zone)
        if not self._facility:
            raise StatisticsNotConfiguredError(
                "this deployment has no facility code: set [stats] facility in the service "
                "configuration to the Ministry's code of this facility (docs/statistics.md)"
            )
        return MonthlyCounts(
            period=period, facility=self._facility, time_zone=self._zone_name,
            min_cell=self._min_cell, cells=suppress(self.count(start, end), self._min_cell),
        )  # fmt: skip

    def count(self, start: datetime, end: datetime) -> Counter[RecordKind]:
        """Verified first versions created in [start, end), by kind (unsuppressed)."""
        query = (
            sa.select(records)
            .where(records.c.version == 1)
            .where(records.c.created_at >= to_utc(start, "start"))
            .where(records.c.created_at < to_utc(end, "end"))
        )

        def tally(connection: sa.Connection) -> Counter[RecordKind]:
            counts: Counter[RecordKind] = Counter()
            # One read transaction: the counts are of one snapshot of the table.
            result = connection.execution_options(yield_per=_BATCH).execute(query)
            for row in result:
                verified = self._verifier.verify(to_stored_record(row))
                counts[RecordKind(verified.row.kind)] += 1
            return counts

        return run_in_transaction(self._engine, tally)
