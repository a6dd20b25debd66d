"""Restore drills: a good backup passes with a signed report; a flipped byte is named.

Real components: the session's SoftHSM2 token, SeaweedFS (scratch buckets are created
and removed), SQLite and PostgreSQL scratch databases.
"""

# Fixtures come from restore_fixtures (the backup conftest is another module's): pytest
# finds them by the imported name, which ruff reads as a redefinition.
# ruff: noqa: F811

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa

from service.backup.drill import ACTION, audited_drill
from storage.audit_model import AuditEntry
from storage.backup.drill import DrillRequest, verify_report
from storage.backup.manifest import object_key
from storage.backup.targets import S3Target, read_all
from tests.integration.backup.restore_fixtures import (  # noqa: F401  (fixtures)
    SignedSource,
    checks_for,
    doc_signer,
    drill_buckets,
    scratch_for,
    signed_source,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_drill_of_a_good_backup_passes_with_a_signed_report(
    signed_source: SignedSource, s3_target: S3Target, trusted_key: bytes, s3_server: Any,
    backend: str,
) -> None:  # fmt: skip
    source = signed_source.source
    backup = source.backup(s3_target)
    events: list[AuditEntry] = []
    phases: set[str] = set()
    request = DrillRequest(s3_target, backup.backup_id, scratch_for(s3_server, backend),
                           lambda p: phases.add(p.phase))  # fmt: skip

    report = audited_drill(request, checks_for(source.pool, signed_source.signer),
                           audit=events.append, principal="console:test")  # fmt: skip

    assert report.ok, report.document["failures"]
    assert report.recovery_seconds > 0
    assert report.records_verified == backup.counts["records"] == len(signed_source.digests)
    assert report.bytes_verified == backup.counts["bytes"]
    doc = report.document
    assert doc["restored"] == doc["expected"] == backup.counts
    assert doc["verified"]["signatures"] == 1
    assert doc["audit_chain"]["ok"]
    assert doc["audit_chain"]["checkpoints_checked"] >= 1
    assert {"objects", "snapshot", "records"} <= phases
    # The report is in the target, signed with the backup key, and says what it returned.
    assert report.key.startswith(f"drills/{backup.backup_id}/")
    assert json.loads(read_all(s3_target, report.key)) == json.loads(json.dumps(doc))
    assert verify_report(s3_target, report.key, trusted_key) is None
    # An audit event, and no scratch bucket left behind.
    assert [(e.action, e.outcome, e.resource) for e in events] == [
        (ACTION, "allowed", f"backup/{backup.backup_id}")
    ]
    assert not drill_buckets(s3_server)


def test_a_tampered_report_fails_its_signature(
    signed_source: SignedSource, s3_target: S3Target, trusted_key: bytes, s3_server: Any,
) -> None:  # fmt: skip
    source = signed_source.source
    backup = source.backup(s3_target)
    report = audited_drill(
        DrillRequest(s3_target, backup.backup_id, scratch_for(s3_server, "sqlite")),
        checks_for(source.pool, signed_source.signer), audit=None, principal="console:test",
    )  # fmt: skip
    forged = read_all(s3_target, report.key).replace(b'"ok":true', b'"ok":false')
    s3_target.delete(report.key)
    s3_target.put(report.key, [forged])
    assert verify_report(s3_target, report.key, trusted_key) == "drill report signature is invalid"


def test_drill_names_the_record_and_object_of_a_flipped_byte(
    signed_source: SignedSource, s3_target: S3Target, s3_server: Any, backend: str,
) -> None:  # fmt: skip
    source = signed_source.source
    backup = source.backup(s3_target)
    victim = backup.manifest.objects[1]
    key = object_key(victim.sha256)
    data = bytearray(read_all(s3_target, key))
    data[len(data) // 2] ^= 0x01
    s3_target.delete(key)
    s3_target.put(key, [bytes(data)])
    events: list[AuditEntry] = []

    report = audited_drill(
        DrillRequest(s3_target, backup.backup_id, scratch_for(s3_server, backend)),
        checks_for(source.pool, signed_source.signer), audit=events.append,
        principal="console:test",
    )  # fmt: skip

    assert not report.ok
    named = {(f.check, f.object_key, f.record_id) for f in report.failures}
    assert ("object", victim.object_key, "") in named  # the copy caught the digest
    with source.engine.connect() as c:
        record_id = c.execute(
            sa.text("SELECT id FROM records WHERE object_key = :k"),
            {"k": victim.object_key},
        ).scalar_one()
    assert any(f.record_id == record_id and f.object_key == victim.object_key
               for f in report.failures), report.document["failures"]  # fmt: skip
    # Every other record still verified; the count check names the shortfall.
    assert report.records_verified == backup.counts["records"] - 1
    assert any(f.check == "count" for f in report.failures)
    assert events[0].outcome == "failed"
    assert not drill_buckets(s3_server)
