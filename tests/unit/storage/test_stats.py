"""Month bounds and small-cell suppression of the statistics export (storage.stats)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from storage.errors import InvalidRecordError, RecordConflictError
from storage.model import RecordKind
from storage.stats import (
    RecordStatistics,
    StatisticsNotConfiguredError,
    month_bounds,
    suppress,
)

HCM = ZoneInfo("Asia/Ho_Chi_Minh")


def test_month_bounds_are_taken_in_the_facility_zone() -> None:
    start, end = month_bounds("2026-10", HCM)
    # Midnight in Ho Chi Minh City is 17:00 UTC the day before.
    assert start.astimezone(UTC) == datetime(2026, 9, 30, 17, tzinfo=UTC)
    assert end.astimezone(UTC) == datetime(2026, 10, 31, 17, tzinfo=UTC)


def test_december_ends_in_january() -> None:
    start, end = month_bounds("2026-12", UTC)
    assert (start, end) == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize("period", ["2026-13", "2026-00", "2026-1", "26-10", "2026/10",
                                    "2026-10-01", " 2026-10", "", "1969-12",
                                    "\uff12\uff10\uff12\uff16-10"])  # fullwidth digits
def test_a_bad_period_names_the_field(period: str) -> None:
    with pytest.raises(InvalidRecordError) as raised:
        month_bounds(period, UTC)
    assert raised.value.field == "period"


@pytest.mark.parametrize(("count", "shown"), [(0, 0), (1, None), (4, None), (5, 5), (60, 60)])
def test_counts_from_one_to_below_the_threshold_are_withheld(count: int, shown: int | None) -> None:
    cells = suppress(Counter({RecordKind.CDA: count}), 5)
    by_kind = {c.kind: c for c in cells}
    assert by_kind[RecordKind.CDA].count == shown
    assert by_kind[RecordKind.CDA].suppressed is (shown is None)


def test_every_kind_has_a_cell_in_enum_order() -> None:
    cells = suppress(Counter(), 5)
    assert [c.kind for c in cells] == list(RecordKind)
    assert all(c.count == 0 for c in cells)


def test_no_facility_refuses_the_export_before_counting() -> None:
    # Neither the database nor the token is touched: None would fail if they were.
    stats = RecordStatistics(None, None, facility="", time_zone="UTC", min_cell=5)  # type: ignore[arg-type]
    with pytest.raises(StatisticsNotConfiguredError) as raised:
        stats.monthly("2026-10")
    assert "[stats] facility" in str(raised.value)
    assert isinstance(raised.value, RecordConflictError)  # FAILED_PRECONDITION
