"""Manifest canonical bytes, signatures, ids and the retention selection (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from storage.backup import BackupError
from storage.backup.manifest import (
    Manifest,
    ManifestObject,
    SnapshotInfo,
    SourceInfo,
    backup_id_of,
    check_backup_id,
    new_backup_id,
    sign,
    signature_problem,
)
from storage.backup.retention import select_kept


class _Signer:
    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())

    @property
    def key_label(self) -> str:
        return "medvault-backup-v1"

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))

    def public_key_der(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _manifest(when: datetime, backup_id: str | None = None) -> Manifest:
    return Manifest(
        id=backup_id or new_backup_id(when), trigger="manual", created_at=when,
        completed_at=when, source=SourceInfo("sqlite://localhost/m.db", "b", "h:1", "host"),
        objects=(
            ManifestObject("objects/b", "b" * 64, 2),
            ManifestObject("objects/a", "a" * 64, 1),
        ),
        snapshot=SnapshotInfo("snapshots/x.jsonl.gz", "c" * 64, 3, {"records": 2}),
        counts={"records": 2}, audit_head={"sequence": 0, "hash": "00"},
        copied={"objects": 2, "bytes": 3},
    )


def test_canonical_round_trip_and_sorted_objects() -> None:
    m = _manifest(datetime(2026, 1, 31, 2, tzinfo=UTC))
    data = m.to_bytes()
    assert b" " not in data
    assert data.index(b'"objects/a"') < data.index(b'"objects/b"')
    assert Manifest.from_bytes(data).to_bytes() == data


def test_signature_pinned_to_trusted_key() -> None:
    signer, other = _Signer(), _Signer()
    data = _manifest(datetime.now(UTC)).to_bytes()
    sig = sign(data, signer)
    assert signature_problem(data, sig, signer.public_key_der()) is None
    assert "other than" in (signature_problem(data, sig, other.public_key_der()) or "")
    assert "invalid" in (signature_problem(data + b" ", sig, signer.public_key_der()) or "")
    assert "malformed" in (signature_problem(data, b"{}", signer.public_key_der()) or "")


def test_ids() -> None:
    backup_id = new_backup_id(datetime(2026, 1, 31, 2, tzinfo=UTC))
    assert backup_id.startswith("20260131T020000Z-")
    assert check_backup_id(backup_id)
    assert backup_id_of(f"manifests/{backup_id}.json") == backup_id
    assert backup_id_of(f"manifests/{backup_id}.sig.json") is None
    with pytest.raises(BackupError):
        check_backup_id("../etc/passwd")


def test_select_kept_policies() -> None:
    start = datetime(2026, 3, 31, 2, tzinfo=UTC)
    manifests = [_manifest(start - timedelta(days=d)) for d in range(60)]  # newest first
    assert len(select_kept(manifests, 7, 0, 0)) == 7
    kept = select_kept(manifests, 0, 0, 3)
    assert {m.completed_at.month for m in manifests if m.id in kept} == {3, 2, 1}
    assert manifests[0].id in select_kept(manifests, 0, 1, 0)
    with pytest.raises(BackupError, match="keeps nothing"):
        select_kept(manifests, 0, 0, 0)
