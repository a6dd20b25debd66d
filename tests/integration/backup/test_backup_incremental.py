"""Incremental copies, the directory target, and a source object that differs from its row."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.backup import SourceIntegrityError
from storage.backup.manifest import MANIFESTS_PREFIX, OBJECTS_PREFIX
from storage.backup.retention import list_backups
from storage.backup.runner import BackupProgress
from storage.backup.targets import DirectoryTarget, S3Target
from storage.backup.verify import verify_backup
from tests.integration.backup.helpers import Source


def test_second_backup_copies_only_new_objects(
    source: Source, s3_target: S3Target, trusted_key: bytes
) -> None:
    first = source.backup(s3_target)
    assert first.copied_objects == 5
    source.add_records(3)
    seen: list[BackupProgress] = []
    second = source.backup(s3_target, progress=seen.append)
    assert second.counts["records"] == 8
    assert second.copied_objects == 3
    assert second.copied_bytes == sum(
        o.size for o in second.manifest.objects if o not in first.manifest.objects
    )
    assert {p.phase for p in seen} == {"snapshot", "objects", "manifest"}
    assert seen[-1].phase == "manifest"
    # Each manifest alone restores: the first still names its 5, the second all 8.
    assert [b.id for b in list_backups(s3_target)] == [second.backup_id, first.backup_id]
    for result in (first, second):
        assert verify_backup(
            s3_target, result.backup_id, trusted_public_key=trusted_key, read_data=True
        ).ok
    assert len(list(s3_target.list(OBJECTS_PREFIX))) == 8


def test_directory_target_round_trip(source: Source, tmp_path: Path, trusted_key: bytes) -> None:
    target = DirectoryTarget(tmp_path / "backups")
    target.ensure()
    result = source.backup(target)
    assert verify_backup(
        target, result.backup_id, trusted_public_key=trusted_key, read_data=True
    ).ok
    assert sorted(target.list(MANIFESTS_PREFIX)) == [
        f"manifests/{result.backup_id}.json",
        f"manifests/{result.backup_id}.sig.json",
    ]
    files = [p for p in (tmp_path / "backups").rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.startswith(".tmp-")]
    assert all(p.stat().st_mode & 0o077 == 0 for p in files)
    victim = result.manifest.objects[0]
    (tmp_path / "backups" / victim.target_key).write_bytes(b"x" * victim.size)
    report = verify_backup(target, result.backup_id, trusted_public_key=trusted_key, read_data=True)
    assert [f.key for f in report.failures] == [victim.object_key]
    again = source.backup(target)
    assert again.copied_objects == 0  # present with the right size: not copied again


def test_corrupt_source_object_is_refused(source: Source, s3_target: S3Target) -> None:
    key = next(iter(source.blobs.list("objects/"))).key
    data = bytearray(b"".join(source.blobs.read(key)))
    data[100] ^= 1
    source.blobs.put(key, [bytes(data)])
    with pytest.raises(SourceIntegrityError, match=key):
        source.backup(s3_target)
    assert list_backups(s3_target) == []
    # Nothing landed under a digest it does not have.
    assert len(list(s3_target.list(OBJECTS_PREFIX))) == 4


def test_object_lock_retention_when_the_bucket_has_it(
    source: Source, s3_server: object, s3_target: S3Target, trusted_key: bytes
) -> None:
    import secrets  # noqa: PLC0415

    client = s3_server.client()  # type: ignore[attr-defined]
    locked = S3Target(client, f"bkl-{secrets.token_hex(8)}", lock_days=1)
    locked.ensure_bucket()
    assert locked.locking  # SeaweedFS 3.8x supports Object Lock
    assert not S3Target(client, s3_target.describe()[5:], lock_days=1).locking
    result = source.backup(locked)
    bucket = locked.describe()[5:]
    retention = client.get_object_retention(bucket, result.manifest.objects[0].target_key)
    assert retention.mode == "GOVERNANCE"
    assert verify_backup(locked, result.backup_id, trusted_public_key=trusted_key).ok
