"""A backup run marker is written by whoever can write the backup target: a value that
does not parse makes the marker say nothing, it never fails the prune that reads it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from storage.backup.run_markers import _document, _time
from storage.backup.targets import DirectoryTarget


def test_a_time_out_of_range_once_in_utc_is_no_time() -> None:
    assert _time("9999-12-31T23:59:59-23:00") is None
    assert _time("0001-01-01T00:00:00+23:00") is None
    assert _time("2026-12-01T10:00:00+01:00") == datetime(2026, 12, 1, 9, tzinfo=UTC)


def test_a_marker_nested_thousands_deep_is_an_empty_document(tmp_path: Path) -> None:
    target = DirectoryTarget(tmp_path)
    target.ensure()
    target.put("runs/deep.json", [b"[" * 4000])
    target.put("runs/fine.json", [b'{"beat_at": "2026-12-01T10:00:00+00:00"}'])
    assert _document(target, "runs/deep.json") == {}
    assert _document(target, "runs/fine.json") == {"beat_at": "2026-12-01T10:00:00+00:00"}
