"""Retention keeps exactly what the policy says and never removes a referenced object."""

from __future__ import annotations

import os
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from storage.backup.manifest import OBJECTS_PREFIX, new_backup_id, run_marker_key, snapshot_key
from storage.backup.retention import list_backups, prune
from storage.backup.targets import DirectoryTarget
from storage.backup.verify import verify_backup

TIMES = {  # completed times (UTC); 2026-03-02 and -09 are Mondays (ISO weeks 10, 11)
    "b1": datetime(2026, 1, 10, 2, tzinfo=UTC),
    "b2": datetime(2026, 2, 20, 2, tzinfo=UTC),
    "b3": datetime(2026, 3, 2, 2, tzinfo=UTC),
    "b4": datetime(2026, 3, 9, 2, tzinfo=UTC),
    "b5": datetime(2026, 3, 9, 14, tzinfo=UTC),
    "b6": datetime(2026, 3, 10, 2, tzinfo=UTC),
    "b7": datetime(2026, 3, 11, 2, tzinfo=UTC),
}
# daily=2: b7, b6; weekly=2: b7 (week 11), b3 (week 10); monthly=2: b7 (Mar), b2 (Feb).
EXPECTED_KEPT = {"b7", "b6", "b3", "b2"}


def test_retention_policy(make_source: Any, tmp_path: Path, trusted_key: bytes) -> None:
    source = make_source("sqlite")
    source.add_records(3)
    target = DirectoryTarget(tmp_path / "t")
    target.ensure()
    ids: dict[str, str] = {}
    only_in_b1 = ""
    for name, when in TIMES.items():
        result = source.backup(target, clock=lambda when=when: when)
        ids[name] = result.backup_id
        if name == "b1":  # a record whose object only b1 holds
            with source.engine.begin() as c:
                row = c.execute(sa.text("SELECT id, ciphertext_sha256 FROM records LIMIT 1")).one()
                c.execute(sa.text("DELETE FROM record_index WHERE record_id = :i"), {"i": row[0]})
                c.execute(sa.text("DELETE FROM records WHERE id = :i"), {"i": row[0]})
            only_in_b1 = OBJECTS_PREFIX + bytes(row[1]).hex()
        source.add_records(1)
    assert [b.id for b in list_backups(target)] == [ids[n] for n in reversed(TIMES)]
    leftover = OBJECTS_PREFIX + secrets.token_hex(32)  # a killed run's object, just written
    target.put(leftover, [b"ciphertext"])

    result = prune(target, keep_daily=2, keep_weekly=2, keep_monthly=2)

    by_id = {v: k for k, v in ids.items()}
    assert {by_id[i] for i in result.kept} == EXPECTED_KEPT
    assert {by_id[i] for i in result.removed} == set(TIMES) - EXPECTED_KEPT
    assert {by_id[b.id] for b in list_backups(target)} == EXPECTED_KEPT
    for name in set(TIMES) - EXPECTED_KEPT:
        assert target.stat(snapshot_key(ids[name])) is None
    for name in EXPECTED_KEPT:  # every kept backup is whole: no referenced object removed
        assert verify_backup(target, ids[name], trusted_public_key=trusted_key).ok
    assert target.stat(only_in_b1) is None  # referenced only by a pruned backup
    assert target.stat(leftover) is not None  # young: may belong to a running backup
    assert result.objects_removed == 1

    later = datetime.now(UTC) + timedelta(days=2)
    again = prune(target, keep_daily=2, keep_weekly=2, keep_monthly=2, now=later)
    assert again.removed == ()
    assert target.stat(leftover) is None
    assert again.objects_removed == 1


def test_running_backup_defers_object_removal(make_source: Any, tmp_path: Path) -> None:
    source = make_source("sqlite")
    source.add_records(2)
    target = DirectoryTarget(tmp_path / "t")
    target.ensure()
    old = source.backup(target, clock=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    source.add_records(1)
    source.backup(target, clock=lambda: datetime(2026, 1, 2, tzinfo=UTC))
    leftover = OBJECTS_PREFIX + secrets.token_hex(32)
    target.put(leftover, [b"x"])
    os.utime(tmp_path / "t" / leftover, (0, 0))  # old
    # A run in progress now (a marker of an earlier release: no beat_at, its write time).
    marker = run_marker_key(new_backup_id(datetime.now(UTC)))
    target.put(marker, [b"{}"])

    result = prune(target, keep_daily=1, keep_weekly=0, keep_monthly=0)
    assert result.removed == (old.backup_id,)
    assert result.objects_deferred
    assert result.objects_removed == 0
    assert target.stat(leftover) is not None
    target.delete(marker)
    assert prune(target, keep_daily=1, keep_weekly=0, keep_monthly=0).objects_removed == 1
