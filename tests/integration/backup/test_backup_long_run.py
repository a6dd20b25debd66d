"""A backup that runs longer than a day keeps everything it wrote while a second run and
its prune go on beside it (cold review: run markers protected runs younger than a day
only); a run marker that beats for ever blocks pruning only up to a bound, visibly.

Real components: the session's SoftHSM2 token, SeaweedFS, SQLite and PostgreSQL. The
long run is held at its last step (both object passes done, manifest not yet written)
by its progress callback, and made a day old by its clock and the prune's ``now``.
"""

# Fixtures come from restore_fixtures (the backup conftest is another module's): pytest
# finds them by the imported name, which ruff reads as a redefinition.
# ruff: noqa: F811

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from service.backup.drill import audited_drill
from storage.backup import runner
from storage.backup.drill import DrillRequest
from storage.backup.manifest import object_key, run_marker_key, snapshot_key
from storage.backup.retention import prune
from storage.backup.runner import BackupProgress, BackupResult
from storage.backup.targets import DirectoryTarget, S3Target, read_all
from storage.backup.verify import verify_backup
from tests.integration.backup.restore_fixtures import (  # noqa: F401  (fixtures)
    SignedSource,
    checks_for,
    doc_signer,
    scratch_for,
    signed_source,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
WAIT = 60.0  # seconds a step of the other thread may take at most


class _Clock:
    """The long run's clock, which the test moves on while the run is held."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _beat_seen(target: S3Target, key: str, at: datetime) -> bool:
    """True once the marker at ``key`` says it beat at ``at`` (the run's clock)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        doc = json.loads(read_all(target, key)) if target.stat(key) is not None else {}
        if doc.get("beat_at") == at.isoformat():
            return True
        time.sleep(0.05)
    return False


def _drop_record(signed: SignedSource) -> str:
    """Delete the rows of a record of one version that no signature names: its object
    is then referenced by the long run's snapshot only, not by the run beside it."""
    versions = Counter(rid for rid, _ in signed.digests)
    record_id = next(r for r, n in versions.items() if n == 1 and r != signed.signed[0])
    engine = signed.source.engine
    with engine.begin() as c:
        row = c.execute(sa.text("SELECT ciphertext_sha256 FROM records WHERE id = :i"),
                        {"i": record_id}).one()  # fmt: skip
        c.execute(sa.text("DELETE FROM record_index WHERE record_id = :i"), {"i": record_id})
        c.execute(sa.text("DELETE FROM records WHERE id = :i"), {"i": record_id})
    return object_key(bytes(row[0]).hex())


def test_a_run_longer_than_a_day_keeps_its_snapshot_and_objects_through_a_prune_beside_it(
    signed_source: SignedSource, s3_target: S3Target, trusted_key: bytes, s3_server: Any,
    backend: str, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(runner, "HEARTBEAT", timedelta(milliseconds=50), raising=False)
    source = signed_source.source
    start = datetime.now(UTC)
    clock = _Clock(start)
    held, release = threading.Event(), threading.Event()
    results: list[BackupResult | Exception] = []

    def hold(p: BackupProgress) -> None:
        if p.phase == "manifest" and p.done == 0:  # both object passes done
            held.set()
            assert release.wait(WAIT), "the test never released the long run"

    def long_run() -> None:
        try:
            results.append(source.backup(s3_target, clock=clock, progress=hold))
        except Exception as e:  # noqa: BLE001  (reported by the main thread)
            results.append(e)

    thread = threading.Thread(target=long_run, name="long-backup")
    thread.start()
    try:
        assert held.wait(WAIT), f"the long run never reached its manifest: {results}"
        only_long = _drop_record(signed_source)
        assert s3_target.stat(only_long) is not None, "the long run copied the object"
        # A day and an hour later (the run's clock and the prune's): the next daily
        # slot's run, then its prune, keeping one daily backup (the new one).
        later = start + timedelta(days=1, hours=1)
        clock.now = later
        markers = [e.key for e in s3_target.entries("runs/")]
        assert len(markers) == 1
        beat = _beat_seen(s3_target, markers[0], later)
        beside = source.backup(s3_target, clock=lambda: later)
        pruned = prune(s3_target, keep_daily=1, keep_weekly=0, keep_monthly=0, now=later)
    finally:
        release.set()
        thread.join(WAIT)
    long = results[0]
    assert isinstance(long, BackupResult), f"the long run failed: {long!r}"
    assert s3_target.stat(snapshot_key(long.backup_id)) is not None, "its snapshot was pruned"
    assert s3_target.stat(only_long) is not None, "an object only the long run holds was pruned"
    assert pruned.objects_deferred, "objects pruned beside a live run"
    assert markers == [run_marker_key(long.backup_id)]
    assert beat, "the long run's marker did not beat"
    assert not list(s3_target.entries("runs/")), "a run marker was left behind"

    for backup in (long, beside):
        report = verify_backup(s3_target, backup.backup_id, trusted_public_key=trusted_key,
                               read_data=True)  # fmt: skip
        assert report.ok, report
    drill = audited_drill(
        DrillRequest(s3_target, long.backup_id, scratch_for(s3_server, backend)),
        checks_for(source.pool, signed_source.signer), audit=None, principal="console:test",
    )  # fmt: skip
    assert drill.ok, drill.document["failures"]
    assert drill.records_verified == len(signed_source.digests)


def _marker(target: DirectoryTarget, root: Path, run_id: str, beat: datetime,
            modified: datetime) -> None:  # fmt: skip
    doc = {"id": run_id, "started_at": run_id, "beat_at": beat.isoformat()}
    target.put(run_marker_key(run_id), [json.dumps(doc).encode()])
    target.put(snapshot_key(run_id), [b"half a snapshot"])
    written = datetime.fromisoformat(run_id.split("-", 1)[0]).timestamp()
    os.utime(root / snapshot_key(run_id), (written, written))
    os.utime(root / run_marker_key(run_id), (modified.timestamp(), modified.timestamp()))


def test_a_marker_beating_past_the_bound_or_from_the_future_blocks_no_pruning_and_is_reported(
    make_source: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A target writer's marker (or a runaway run's) kept fresh for ever, or dated a
    year ahead, must not keep every unreferenced object for ever: past MAX_RUN_AGE
    (seven days) or ahead of now it is not taken for a live run, and it is reported.
    A run that crashed a day ago is pruned as before."""
    source = make_source("sqlite")
    source.add_records(1)
    root = tmp_path / "t"
    target = DirectoryTarget(root)
    target.ensure()
    source.backup(target)
    now = datetime.now(UTC)
    leftover = object_key(secrets.token_hex(32))
    target.put(leftover, [b"a killed run's object"])
    old = now - timedelta(days=2)
    os.utime(root / leftover, (old.timestamp(), old.timestamp()))
    runaway = (now - timedelta(days=8)).strftime("%Y%m%dT%H%M%SZ") + "-0123abcd"
    _marker(target, root, runaway, beat=now, modified=now)  # beats for ever
    ahead = (now - timedelta(days=3)).strftime("%Y%m%dT%H%M%SZ") + "-4567cdef"
    _marker(target, root, ahead, beat=now + timedelta(days=365), modified=old)
    crashed = old.strftime("%Y%m%dT%H%M%SZ") + "-89abcdef"
    _marker(target, root, crashed, beat=old, modified=old)

    with caplog.at_level(logging.WARNING, logger="storage.backup.run_markers"):
        result = prune(target, keep_daily=1, keep_weekly=0, keep_monthly=0, now=now)

    assert not result.objects_deferred, "a marker past the bound still blocks pruning"
    assert target.stat(leftover) is None
    assert sorted(result.overdue_runs) == sorted([runaway, ahead])
    assert {runaway, ahead} <= {r.message.rsplit("/", 1)[-1].removesuffix(".json")
                                for r in caplog.records}  # fmt: skip
    for run_id in (runaway, ahead, crashed):
        assert target.stat(snapshot_key(run_id)) is None, f"{run_id}'s leftover snapshot"
    for run_id in (ahead, crashed):
        assert target.stat(run_marker_key(run_id)) is None, "a stale marker stays"
