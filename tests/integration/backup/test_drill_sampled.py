"""Sampled and parallel restore drills: what the sample decrypts, what every row gets, and
that a missing or tampered object still fails the drill naming its record.

Real components: the session's SoftHSM2 token, SeaweedFS (scratch buckets created and
removed), SQLite scratch databases (the full drill's tests run both backends).
"""

# Fixtures come from restore_fixtures (the backup conftest is another module's): pytest
# finds them by the imported name, which ruff reads as a redefinition.
# ruff: noqa: F811

from __future__ import annotations

import json
from datetime import UTC, datetime
from functools import partial
from typing import Any

import pytest
import sqlalchemy as sa

from service.backup import Backups, RetentionPolicy
from service.backup.drill import ACTION, audited_drill, drill_runner, sample_plan
from service.backup.scheduler import IntervalSchedule
from storage.audit_model import AuditEntry
from storage.backup.drill import DrillReport, DrillRequest
from storage.backup.manifest import object_key
from storage.backup.runner import BackupResult
from storage.backup.sampling import SamplePlan, rank
from storage.backup.targets import S3Target, read_all
from storage.errors import InvalidRecordError
from tests.integration.backup.helpers import forge_backup_snapshot
from tests.integration.backup.restore_fixtures import (  # noqa: F401  (fixtures)
    SignedSource,
    checks_for,
    doc_signer,
    drill_buckets,
    scratch_for,
    signed_source,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
SEED = bytes.fromhex("5eed" * 8)
ONE_RECORD = SamplePlan(0.5, 0.5, SEED)  # n = 1: ceil(ln 0.5 / ln 0.5)


def _drill(signed: SignedSource, target: S3Target, backup_id: str, s3_server: Any,
           *, sample: SamplePlan | None = None, workers: int = 2,
           events: list[AuditEntry] | None = None) -> DrillReport:  # fmt: skip
    request = DrillRequest(target, backup_id, scratch_for(s3_server, "sqlite"),
                           workers=workers, sample=sample)  # fmt: skip
    return audited_drill(request, checks_for(signed.source.pool, signed.signer),
                         audit=None if events is None else events.append,
                         principal="console:test")  # fmt: skip


def _by_rank(backup: BackupResult, signed: SignedSource) -> list[tuple[str, int, str]]:
    """(record id, version, object key) of every record version, lowest rank first."""
    with signed.source.engine.connect() as c:
        rows = c.execute(sa.text("SELECT id, version, object_key FROM records")).all()
    assert len(rows) == backup.counts["records"]
    return sorted(((r[0], r[1], r[2]) for r in rows), key=lambda r: rank(SEED, (r[0], r[1])))


def _replace(target: S3Target, key: str, data: bytes | None) -> None:
    target.delete(key)
    if data is not None:
        target.put(key, [data])


def test_sampled_drill_checks_every_row_decrypts_the_sample_and_records_the_seed(
    signed_source: SignedSource, s3_target: S3Target, s3_server: Any,
) -> None:  # fmt: skip
    backup = signed_source.source.backup(s3_target)
    events: list[AuditEntry] = []
    plan = SamplePlan(0.75, 0.5, SEED)  # n = 2 of the 4 record versions

    report = _drill(signed_source, s3_target, backup.backup_id, s3_server, sample=plan,
                    events=events)  # fmt: skip

    assert report.ok, report.document["failures"]
    assert report.sampled
    doc = report.document
    assert doc["mode"] == "sampled"
    sample = doc["sample"]
    assert (sample["seed"], sample["size"], sample["planned_size"]) == (SEED.hex(), 2, 2)
    assert sample["population"] == backup.counts["records"] == 4
    assert (sample["confidence"], sample["max_defect_rate"]) == (0.75, 0.5)
    # Every row authenticated and matched with the manifest; only the sample decrypted
    # and restored; every signature at least unsealed.
    assert doc["verified"]["records"] == report.records_verified == 4
    assert doc["verified"]["decrypted"] == 2
    assert doc["objects_restored"] == 2
    verified = doc["verified"]
    assert verified["signatures"] + verified["signatures_unsealed"] == 1
    assert doc["audit_chain"]["ok"]
    assert doc["restored"] == doc["expected"] == backup.counts
    assert doc["throughput"]["workers"] == 2
    assert doc["throughput"]["records_per_second"] > 0
    # The signed report says so too, and the audit event names the kind of drill.
    assert json.loads(read_all(s3_target, report.key))["mode"] == "sampled"
    assert events[0].action == ACTION
    assert events[0].outcome == "allowed"
    assert "sampled drill (2 of 4 records decrypted" in events[0].reason
    assert SEED.hex() in events[0].reason
    # The same seed chooses the same sample: an auditor can repeat the drill.
    again = _drill(signed_source, s3_target, backup.backup_id, s3_server, sample=plan)
    assert again.document["sample"]["selection_sha256"] == sample["selection_sha256"]
    assert not drill_buckets(s3_server)


@pytest.mark.parametrize("backend", ["sqlite"])  # the first test runs both
def test_a_tampered_object_in_the_sample_fails_naming_its_record(
    signed_source: SignedSource, s3_target: S3Target, s3_server: Any,
) -> None:  # fmt: skip
    backup = signed_source.source.backup(s3_target)
    record_id, version, victim = _by_rank(backup, signed_source)[0]  # the one sampled
    listed = next(o for o in backup.manifest.objects if o.object_key == victim)
    data = bytearray(read_all(s3_target, object_key(listed.sha256)))
    data[len(data) // 2] ^= 0x01
    _replace(s3_target, object_key(listed.sha256), bytes(data))

    report = _drill(signed_source, s3_target, backup.backup_id, s3_server, sample=ONE_RECORD)

    assert not report.ok
    assert report.document["sample"]["size"] == 1
    assert any(f.record_id == record_id and f.version == version and f.object_key == victim
               for f in report.failures), report.document["failures"]  # fmt: skip
    assert report.records_verified == 3  # the other rows still checked


@pytest.mark.parametrize("backend", ["sqlite"])  # the first test runs both
def test_a_missing_object_outside_the_sample_fails_naming_its_record(
    signed_source: SignedSource, s3_target: S3Target, s3_server: Any,
) -> None:  # fmt: skip
    backup = signed_source.source.backup(s3_target)
    record_id, _version, victim = _by_rank(backup, signed_source)[-1]  # never sampled
    listed = next(o for o in backup.manifest.objects if o.object_key == victim)
    _replace(s3_target, object_key(listed.sha256), None)

    report = _drill(signed_source, s3_target, backup.backup_id, s3_server, sample=ONE_RECORD)

    assert not report.ok
    named = [(f.check, f.record_id, f.object_key) for f in report.failures]
    assert ("object", "", victim) in named  # the manifest entry
    assert ("object", record_id, victim) in named  # and the record that needs it
    assert report.document["verified"]["decrypted"] == 1


@pytest.mark.parametrize("backend", ["sqlite"])  # the first test runs both
def test_full_parallel_drill_names_the_record_of_a_missing_object(
    signed_source: SignedSource, s3_target: S3Target, s3_server: Any,
) -> None:  # fmt: skip
    backup = signed_source.source.backup(s3_target)
    record_id, version, victim = _by_rank(backup, signed_source)[1]
    listed = next(o for o in backup.manifest.objects if o.object_key == victim)
    _replace(s3_target, object_key(listed.sha256), None)

    report = _drill(signed_source, s3_target, backup.backup_id, s3_server, workers=3)

    assert not report.ok
    assert report.document["mode"] == "full"
    assert "sample" not in report.document
    assert any(f.check == "object" and f.object_key == victim for f in report.failures)
    assert any(f.record_id == record_id and f.version == version for f in report.failures)
    assert report.records_verified == backup.counts["records"] - 1
    assert report.document["verified"]["decrypted"] == report.records_verified


def test_sample_settings_are_checked_before_anything_runs() -> None:
    assert sample_plan(0.0, 0.0, "") is None  # a full drill
    plan = sample_plan(0.99, 0.0, "ab")
    assert plan is not None
    assert (plan.max_defect_rate, plan.seed, plan.size) == (0.01, b"\xab", 459)
    for args, field in (((0.0, 0.01, ""), "sample_confidence"),
                        ((0.0, 0.0, "ab"), "sample_confidence"),
                        ((2.0, 0.01, ""), "sample_confidence"),
                        ((0.99, 1.5, ""), "max_defect_rate"),
                        ((0.99, 0.01, "not hex"), "seed")):  # fmt: skip
        with pytest.raises(InvalidRecordError) as caught:
            sample_plan(*args)
        assert caught.value.field == field


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_scheduled_drill_is_sampled_when_configured(
    signed_source: SignedSource, s3_target: S3Target, s3_server: Any,
) -> None:  # fmt: skip
    source = signed_source.source
    backup = source.backup(s3_target)
    runner = drill_runner(s3_target, scratch_for(s3_server, "sqlite"),
                          checks_for(source.pool, signed_source.signer), workers=2)  # fmt: skip
    backups = Backups(
        source.engine, source.blobs, s3_target, source.signer(), source.identity(),
        retention=RetentionPolicy(prune=False), drill=runner, workers=2,
        scheduled_sample=partial(sample_plan, 0.5, 0.5, ""),  # as [backup] would configure
    )  # fmt: skip
    [job] = backups.scheduled_jobs(None, IntervalSchedule(3600))

    result = job.run(datetime.now(UTC))

    assert result.ok, result.detail
    assert result.backup_id == backup.backup_id
    assert "sampled drill (1 of 4 records decrypted, confidence 0.5" in result.detail
    assert "records/s" in result.detail
    reports = [k for k in s3_target.list(f"drills/{backup.backup_id}/") if k.endswith(".json")
               and not k.endswith(".sig.json")]  # fmt: skip
    [doc] = [json.loads(read_all(s3_target, k)) for k in reports]
    assert doc["mode"] == "sampled"
    assert len(doc["sample"]["seed"]) == 32  # a new 128-bit seed, recorded


@pytest.mark.parametrize("sample", [ONE_RECORD, None], ids=["sampled", "full"])
def test_a_backup_holding_a_value_of_another_type_fails_the_drill_naming_the_column(
    signed_source: SignedSource, s3_target: S3Target, s3_server: Any, sample: SamplePlan | None,
) -> None:  # fmt: skip
    """A signed backup an earlier release made, its snapshot holding a database writer's
    version of another type: the drill fails by table and column (the sample's
    ``int(str(version))`` and the restore's ``int(kek_version)`` named the value)."""
    source = signed_source.source
    backup = source.backup(s3_target)
    forge_backup_snapshot(source, s3_target, backup.backup_id, "records", "version",
                          "SYNTHETIC-FORGED")  # fmt: skip

    report = _drill(signed_source, s3_target, backup.backup_id, s3_server, sample=sample)

    assert not report.ok
    assert [f.check for f in report.failures] == ["restore"]
    assert "records" in report.failures[0].detail
    assert "(version)" in report.failures[0].detail
    assert "SYNTHETIC" not in json.dumps(report.document)
