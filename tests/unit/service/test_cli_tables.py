"""The CLI's fixed-width table printer and its text forms."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from service.cli import tables


def test_columns_fit_the_widest_cell_and_numbers_align_right() -> None:
    lines = list(tables.render(["ID", "NAME"], [[7, "a"], [12345, "longer name"]], numeric=[0]))
    assert lines == [
        "   ID  NAME",
        "-----  -----------",
        "    7  a",
        "12345  longer name",
    ]


def test_max_width_truncates_with_an_ellipsis() -> None:
    lines = list(tables.render(["REASON"], [["x" * 30]], max_widths={0: 10}))
    assert lines[2] == "x" * 9 + "…"
    assert len(lines[1]) == 10


def test_rows_after_the_sample_keep_the_sampled_widths() -> None:
    rows = [["ab"], ["abcdef"]]
    lines = list(tables.render(["C"], rows, sample=1))
    assert lines[-1] == "a…"


def test_control_characters_are_escaped() -> None:
    (line,) = list(tables.render(["R"], [["red\x1b[31m\nnext"]]))[2:]
    assert "\x1b" not in line
    assert "\n" not in line
    assert "\\x1b[31m\\nnext" in line


def test_non_ascii_is_kept() -> None:
    assert tables.clean("bệnh nhân") == "bệnh nhân"


def test_row_of_the_wrong_length_is_an_error() -> None:
    with pytest.raises(ValueError, match="2 cells for 1 columns"):
        list(tables.render(["A"], [[1, 2]]))


def test_print_table_counts_rows() -> None:
    out = io.StringIO()
    assert tables.print_table(["A"], [[1], [2]], out=out) == 2
    assert out.getvalue().splitlines()[0] == "A"
    assert tables.print_table(["A"], [], out=out) == 0


def test_utc_forms() -> None:
    moment = datetime(2026, 1, 2, 10, 4, 5, 999, tzinfo=timezone(timedelta(hours=7)))
    assert tables.utc(moment) == "2026-01-02T03:04:05Z"
    ts = Timestamp()
    ts.FromDatetime(moment.astimezone(UTC))
    assert tables.utc(ts) == "2026-01-02T03:04:05Z"
    assert tables.utc(Timestamp()) == "-"
    assert tables.utc(None) == "-"
    assert tables.utc(datetime(2026, 1, 2)) == "2026-01-02T00:00:00Z"


def test_truncate_edges() -> None:
    assert tables.truncate("abc", 3) == "abc"
    assert tables.truncate("abcd", 3) == "ab…"
    assert tables.truncate("abc", 0) == ""


def test_short_ids_cuts_32_hex_ids_only() -> None:
    grant = "0f3b9e2c" + "a" * 24
    assert tables.short_ids(f"break-the-glass grant {grant}") == "break-the-glass grant 0f3b9e2c…"
    assert tables.short_ids(f"record/{grant}/v2") == "record/0f3b9e2c…/v2"
    assert tables.short_ids("ab" * 32) == "ab" * 32  # a 64-hex digest is not an id
    assert tables.short_ids("no active care-team grant") == "no active care-team grant"


def test_fit_takes_width_from_the_shrink_columns_in_order() -> None:
    headers = ["ID", "RESOURCE", "REASON"]
    # 10 + 40 + 40 + 2 gaps of 2 = 94 columns; fit to 80: RESOURCE gives up 14 first.
    assert tables.fit([10, 40, 40], headers, 80, shrink=(1, 2)) == [10, 26, 40]
    # To 60: RESOURCE goes down to MIN_WIDTH, then REASON gives the rest.
    assert tables.fit([10, 40, 40], headers, 60, shrink=(1, 2)) == [10, 12, 34]
    # Never below a column's header or MIN_WIDTH, even if the table stays too wide.
    assert tables.fit([10, 40, 40], headers, 10, shrink=(1, 2)) == [10, 12, 12]
    assert tables.fit([10, 40, 40], headers, 200, shrink=(1, 2)) == [10, 40, 40]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_print_table_fits_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")  # the terminal's size, as shutil reads it
    out = _Terminal()
    tables.print_table(["A", "TEXT"], [["x" * 30, "y" * 30]], out=out, shrink=(0, 1))
    assert all(len(line) <= 40 for line in out.getvalue().splitlines())
    assert "y" * 20 in out.getvalue(), "the last shrink column was cut first"
    piped = io.StringIO()  # not a terminal: never cut to a width, whatever COLUMNS says
    tables.print_table(["A", "TEXT"], [["x" * 30, "y" * 30]], out=piped, shrink=(0, 1))
    assert "x" * 30 in piped.getvalue()
    assert "y" * 30 in piped.getvalue()
