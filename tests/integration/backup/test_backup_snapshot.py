"""Snapshot export -> load into an empty migrated database, on and across both backends."""

from __future__ import annotations

from typing import Any

import pytest

from storage.backup import SnapshotLoadError
from storage.backup.snapshot import export, load, tables
from storage.sql_metadata import make_engine, upgrade
from tests.integration.backup.helpers import Source, table_rows


@pytest.mark.parametrize("into", ["sqlite", "postgresql"])
def test_export_load_round_trip(source: Source, fresh_url: Any, into: str) -> None:
    snapshot = export(source.engine)
    data = b"".join(snapshot)
    assert snapshot.stats.tables["records"] == 5
    assert snapshot.stats.audit_head["sequence"] == 1
    engine = make_engine(fresh_url(into))
    try:
        upgrade(engine)
        # Fed in small pieces: lines and gzip members split across chunks.
        counts = load(engine, (data[i : i + 97] for i in range(0, len(data), 97)))
        assert counts == snapshot.stats.tables
        for table in tables():
            assert table_rows(engine, table) == table_rows(source.engine, table), table.name
        with pytest.raises(SnapshotLoadError, match="not empty"):
            load(engine, [data])
    finally:
        engine.dispose()


def test_truncated_snapshot_loads_nothing(source: Source, fresh_url: Any, backend: str) -> None:
    data = b"".join(export(source.engine))
    engine = make_engine(fresh_url(backend))
    try:
        upgrade(engine)
        with pytest.raises(SnapshotLoadError):
            load(engine, [data[: len(data) // 2]])
        assert all(not table_rows(engine, t) for t in tables() if t.name != "audit_head")
    finally:
        engine.dispose()
