"""Backup -> wipe -> restore: every record byte-identical, signatures valid; refusals.

Real components: the session's SoftHSM2 token, SeaweedFS, SQLite and PostgreSQL.
Failure messages name records and counts, never content.
"""

# Fixtures come from restore_fixtures (the backup conftest is another module's): pytest
# finds them by the imported name, which ruff reads as a redefinition.
# ruff: noqa: F811

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from keystore import Pkcs11KeyWrapper
from storage.audit_log import SqlAuditLog
from storage.backup import SnapshotLoadError
from storage.backup.restore import (
    Deployment,
    MissingKekError,
    TargetNotEmptyError,
    restore,
)
from storage.backup.targets import S3Target
from storage.sql_metadata import records
from tests.integration.backup.helpers import forge_backup_snapshot
from tests.integration.backup.restore_fixtures import (  # noqa: F401  (fixtures)
    SignedSource,
    count,
    doc_signer,
    empty_deployment,
    signed_source,
    wipe,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _restore(signed: SignedSource, target: S3Target, backup_id: str, into: Any,
             trusted: bytes, **kwargs: Any) -> Any:  # fmt: skip
    pool = signed.source.pool
    return restore(target, backup_id, into, keks=Pkcs11KeyWrapper(pool),
                   token_label=pool.config.token_label, trusted_public_key=trusted,
                   **kwargs)  # fmt: skip


def test_backup_wipe_restore_every_record_identical_and_signed(
    signed_source: SignedSource, s3_target: S3Target, trusted_key: bytes
) -> None:
    source = signed_source.source
    backup = source.backup(s3_target)
    wipe(source)
    assert count(source.engine, "records") == 0
    assert not list(source.blobs.list())

    progress: list[str] = []
    result = _restore(signed_source, s3_target, backup.backup_id, source, trusted_key,
                      progress=lambda p: progress.append(p.phase))  # fmt: skip

    assert result.ok, [f.detail for f in result.failures]
    assert result.objects == backup.counts["objects"]
    assert result.tables == backup.manifest.snapshot.tables
    assert {"objects", "snapshot"} <= set(progress)
    store = signed_source.store()
    for (record_id, version), digest in signed_source.digests.items():
        opened = store.open(record_id, version)
        content = b"".join(opened.content)
        assert hashlib.sha256(content).digest() == digest, f"record {record_id} v{version}"
        assert opened.info.sha256 == digest
    record_id, version = signed_source.signed
    verdicts = signed_source.signing().verify(record_id, version, lambda _: None)
    assert verdicts, "the signed record lost its signature"
    assert all(v.valid for _, v, _ in verdicts), [v.reason for _, v, _ in verdicts]
    assert SqlAuditLog(source.engine).head()[0] == backup.manifest.audit_head["sequence"]


def test_restore_refuses_a_non_empty_target_unless_forced(
    signed_source: SignedSource, s3_target: S3Target, trusted_key: bytes,
    empty_deployment: Deployment,
) -> None:  # fmt: skip
    source = signed_source.source
    backup = source.backup(s3_target)

    # The source itself is anything but empty: refused, nothing written.
    objects_before = sorted(i.key for i in source.blobs.list())
    with pytest.raises(TargetNotEmptyError, match="not empty"):
        _restore(signed_source, s3_target, backup.backup_id, source, trusted_key)
    assert sorted(i.key for i in source.blobs.list()) == objects_before

    # A deployment holding one object only: refused, then overwritten with --force.
    empty_deployment.blobs.put("objects/stray", [b"not a record"])
    with pytest.raises(TargetNotEmptyError, match="bucket"):
        _restore(signed_source, s3_target, backup.backup_id, empty_deployment, trusted_key)
    assert count(empty_deployment.engine, "records") == 0
    result = _restore(signed_source, s3_target, backup.backup_id, empty_deployment,
                      trusted_key, force=True)  # fmt: skip
    assert result.ok
    assert count(empty_deployment.engine, "records") == backup.counts["records"]


class _TokenWithout:
    """The test token as a restore sees it, minus some KEK versions (a token restored
    from an old backup of itself)."""

    def __init__(self, wrapper: Pkcs11KeyWrapper, hidden: set[int]) -> None:
        self._wrapper = wrapper
        self._hidden = hidden

    def versions(self) -> list[int]:
        return [v for v in self._wrapper.versions() if v not in self._hidden]


def test_restore_names_missing_kek_versions_before_copying(
    signed_source: SignedSource, s3_target: S3Target, trusted_key: bytes,
    empty_deployment: Deployment,
) -> None:  # fmt: skip
    source = signed_source.source
    backup = source.backup(s3_target)
    with source.engine.connect() as c:
        used = {row.kek_version for row in c.execute(records.select())}
    token = _TokenWithout(Pkcs11KeyWrapper(source.pool), used)
    with pytest.raises(MissingKekError) as caught:
        restore(s3_target, backup.backup_id, empty_deployment, keks=token,
                token_label=source.pool.config.token_label,
                trusted_public_key=trusted_key)  # fmt: skip
    assert caught.value.missing == sorted(used)
    assert all(f"v{v}" in str(caught.value) for v in used)
    assert not list(empty_deployment.blobs.list()), "objects copied despite the missing KEK"
    assert count(empty_deployment.engine, "records") == 0


@pytest.mark.parametrize(("column", "value"), [
    ("kek_version", "SYNTHETIC-FORGED"),  # int() of it named it
    ("stored_size", "SYNTHETIC-FORGED"),  # PostgreSQL's refusal of the insert named it
])  # fmt: skip
def test_a_backup_holding_a_value_of_another_type_is_refused_naming_the_column(
    signed_source: SignedSource, s3_target: S3Target, trusted_key: bytes,
    empty_deployment: Deployment, column: str, value: str,
) -> None:  # fmt: skip
    """A signed backup an earlier release made, whose snapshot copied a database writer's
    value of another type: refused before anything is copied, by table and column."""
    source = signed_source.source
    backup = source.backup(s3_target)
    forge_backup_snapshot(source, s3_target, backup.backup_id, "records", column, value)
    with pytest.raises(SnapshotLoadError, match=rf"records .*\({column}\)") as raised:
        _restore(signed_source, s3_target, backup.backup_id, empty_deployment, trusted_key)
    assert "SYNTHETIC" not in str(raised.value)
    assert not list(empty_deployment.blobs.list()), "objects copied despite the refusal"
    assert count(empty_deployment.engine, "records") == 0
