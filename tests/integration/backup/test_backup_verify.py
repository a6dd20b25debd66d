"""Backup then verify; damage the target in each way and check verify names the damage."""

from __future__ import annotations

import io
import json

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from storage.backup.manifest import Manifest, manifest_key, sign, signature_key
from storage.backup.retention import list_backups
from storage.backup.targets import S3Target, read_all
from storage.backup.verify import verify_backup
from tests.integration.backup.helpers import Source


def _replace(target: S3Target, key: str, data: bytes) -> None:
    target.delete(key)
    target.put(key, [data])


def test_backup_then_verify_read_data_ok(
    source: Source, s3_target: S3Target, trusted_key: bytes
) -> None:
    result = source.backup(s3_target)
    assert result.counts["records"] == 5
    assert result.counts["objects"] == 5
    assert result.counts["audit_events"] == 1
    assert result.counts["signatures"] == 1
    assert result.counts["grants"] == 1
    assert result.copied_objects == 5
    report = verify_backup(
        s3_target, result.backup_id, trusted_public_key=trusted_key, read_data=True
    )
    assert report.ok, report.failures
    assert report.bytes_read == result.counts["bytes"]
    assert report.seconds > 0  # the throughput callers show
    assert report.bytes_per_second == report.bytes_read / report.seconds
    assert report.objects_per_second > 0
    listed = list_backups(s3_target)
    assert [b.id for b in listed] == [result.backup_id]
    assert listed[0].records == 5
    # No credentials in the source identity.
    assert "@" not in result.manifest.source.database


def test_flipped_byte_named_by_read_data_only(
    source: Source, s3_target: S3Target, trusted_key: bytes
) -> None:
    result = source.backup(s3_target)
    victim = result.manifest.objects[2]
    data = bytearray(read_all(s3_target, victim.target_key))
    data[len(data) // 2] ^= 0x01
    _replace(s3_target, victim.target_key, bytes(data))

    plain = verify_backup(s3_target, result.backup_id, trusted_public_key=trusted_key)
    assert plain.ok  # same size: only reading the bytes can tell
    deep = verify_backup(
        s3_target, result.backup_id, trusted_public_key=trusted_key, read_data=True
    )
    assert not deep.ok
    assert [f.key for f in deep.failures] == [victim.object_key]
    assert "SHA-256" in deep.failures[0].problem


def test_size_change_and_missing_object_caught_without_read_data(
    source: Source, s3_target: S3Target, trusted_key: bytes
) -> None:
    result = source.backup(s3_target)
    shorter, gone = result.manifest.objects[0], result.manifest.objects[1]
    _replace(s3_target, shorter.target_key, read_all(s3_target, shorter.target_key)[:-1])
    s3_target.delete(gone.target_key)

    report = verify_backup(s3_target, result.backup_id, trusted_public_key=trusted_key)
    assert not report.ok
    problems = {f.key: f.problem for f in report.failures}
    assert set(problems) == {shorter.object_key, gone.object_key}
    assert "missing" in problems[gone.object_key]
    assert "size" in problems[shorter.object_key]


def test_tampered_manifest_fails_signature(
    source: Source, s3_target: S3Target, trusted_key: bytes
) -> None:
    result = source.backup(s3_target)
    key = manifest_key(result.backup_id)
    doc = json.loads(read_all(s3_target, key))
    doc["counts"]["records"] += 1
    tampered = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    _replace(s3_target, key, tampered)
    report = verify_backup(s3_target, result.backup_id, trusted_public_key=trusted_key)
    assert not report.ok
    assert not report.signature_ok
    assert "signature is invalid" in report.failures[0].problem

    # Re-signed by another key: a valid signature, but not by the backup key.
    forger = _SoftSigner()
    _replace(s3_target, signature_key(result.backup_id), sign(tampered, forger))
    forged = verify_backup(s3_target, result.backup_id, trusted_public_key=trusted_key)
    assert not forged.ok
    assert "other than the trusted" in forged.failures[0].problem
    # ... which verifies only if that forged key is the one trusted.
    assert verify_backup(
        s3_target, result.backup_id, trusted_public_key=forger.public_key_der()
    ).signature_ok


def test_snapshot_damage_is_caught(source: Source, s3_target: S3Target, trusted_key: bytes) -> None:
    result = source.backup(s3_target)
    snap = result.manifest.snapshot.key
    data = bytearray(read_all(s3_target, snap))
    data[-10] ^= 0xFF
    _replace(s3_target, snap, bytes(data))
    report = verify_backup(s3_target, result.backup_id, trusted_public_key=trusted_key)
    assert [f.key for f in report.failures] == [snap]


def test_no_plaintext_in_the_target(source: Source, s3_target: S3Target) -> None:
    source.backup(s3_target)
    needles = [source.patient.encode(), source.marker.encode()]
    for key in s3_target.list(""):
        blob = read_all(s3_target, key)
        # The snapshot is gzip'd: look inside it too.
        views = [blob]
        if key.endswith(".gz"):
            import gzip  # noqa: PLC0415

            views.append(gzip.GzipFile(fileobj=io.BytesIO(blob)).read())
        for view in views:
            for needle in needles:
                assert needle not in view, key
    manifest = Manifest.from_bytes(read_all(s3_target, manifest_key(list_backups(s3_target)[0].id)))
    assert manifest.counts["records"] == 5


class _SoftSigner:
    """A software EC key standing in for a forger's own key."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())

    @property
    def key_label(self) -> str:
        return "medvault-backup-v1"

    def sign(self, data: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes  # noqa: PLC0415

        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))

    def public_key_der(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
