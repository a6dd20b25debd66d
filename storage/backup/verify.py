"""Verify a backup: the manifest's signature first, then every file it names.

The signature is checked before anything in the manifest is believed, against a pinned
key (the token's backup public key, or a trusted key file for offline checks). Then
every object's presence and size (one listing), and with ``read_data`` every byte's
SHA-256; the snapshot's size and digest always. Each missing or corrupt object is named
by the record object key it backs and its key in the target. ``read_data`` reads objects
on ``workers`` threads with at most ``2 x workers`` in flight
(:func:`storage.backup.pool.bounded_map`), each streamed; the report gives the time
taken, so callers show the throughput.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass

from storage.backup import BackupError, BackupNotFoundError
from storage.backup.manifest import (
    OBJECTS_PREFIX,
    Manifest,
    ManifestObject,
    manifest_key,
    signature_key,
    signature_problem,
)
from storage.backup.pool import bounded_map
from storage.backup.runner import BackupProgress, ProgressCallback
from storage.backup.targets import BackupTarget, read_all
from storage.errors import RecordNotFoundError


@dataclass(frozen=True, slots=True)
class VerifyFailure:
    """One problem: ``key`` names the file (or record object) it concerns."""

    key: str
    problem: str


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of a verification; ``ok`` is False on any failure."""

    backup_id: str
    signature_ok: bool
    read_data: bool
    objects_checked: int
    bytes_read: int
    failures: tuple[VerifyFailure, ...]
    manifest: Manifest | None
    seconds: float = 0.0  # wall time of the whole verification

    @property
    def ok(self) -> bool:
        """True only if the signature and every file checked out."""
        return self.signature_ok and not self.failures

    @property
    def bytes_per_second(self) -> float:
        """Bytes read and hashed per second of the verification (0 without read_data)."""
        return self.bytes_read / self.seconds if self.seconds > 0 else 0.0

    @property
    def objects_per_second(self) -> float:
        """Objects checked per second of the verification."""
        return self.objects_checked / self.seconds if self.seconds > 0 else 0.0


def _sha256_of(target: BackupTarget, key: str) -> tuple[str, int]:
    """SHA-256 and size of ``key``; an empty digest if it vanished meanwhile."""
    digest, size = hashlib.sha256(), 0
    try:
        for chunk in target.read(key):
            digest.update(chunk)
            size += len(chunk)
    except RecordNotFoundError:
        return "", size
    return digest.hexdigest(), size


def load_manifest(
    target: BackupTarget, backup_id: str, trusted_public_key: bytes
) -> tuple[Manifest | None, str | None]:
    """The manifest if its signature holds under the trusted key, else the problem.

    ``BackupNotFoundError`` when the manifest or its signature is absent (incomplete).
    """
    try:
        data = read_all(target, manifest_key(backup_id))
        sig = read_all(target, signature_key(backup_id), limit=1 << 20)
    except RecordNotFoundError as e:
        raise BackupNotFoundError(f"no complete backup {backup_id} in {target.describe()}") from e
    problem = signature_problem(data, sig, trusted_public_key)
    if problem is not None:
        return None, problem
    try:
        manifest = Manifest.from_bytes(data)
    except BackupError as e:
        return None, str(e)
    if manifest.id != backup_id:
        return None, f"manifest names backup {manifest.id}, not {backup_id}"
    return manifest, None


def _check_snapshot(target: BackupTarget, manifest: Manifest) -> list[VerifyFailure]:
    snap = manifest.snapshot
    size = target.stat(snap.key)
    if size is None:
        return [VerifyFailure(snap.key, "snapshot missing")]
    if size != snap.size:
        return [VerifyFailure(snap.key, f"snapshot size {size}, manifest says {snap.size}")]
    if _sha256_of(target, snap.key)[0] != snap.sha256:
        return [VerifyFailure(snap.key, "snapshot SHA-256 differs from the manifest (corrupt)")]
    return []


def _object_problem(present: dict[str, int], obj: ManifestObject) -> str | None:
    size = present.get(obj.target_key)
    if size is None:
        return f"missing from the target ({obj.target_key})"
    if size != obj.size:
        return f"size {size} in the target ({obj.target_key}), manifest says {obj.size}"
    return None


def verify_backup(
    target: BackupTarget,
    backup_id: str,
    *,
    trusted_public_key: bytes,
    read_data: bool = False,
    progress: ProgressCallback | None = None,
    workers: int = 4,
) -> VerifyReport:
    """Check backup ``backup_id`` in ``target``; see the module docstring."""
    started = time.monotonic()
    manifest, problem = load_manifest(target, backup_id, trusted_public_key)
    if manifest is None:
        failure = VerifyFailure(manifest_key(backup_id), problem or "manifest unreadable")
        return VerifyReport(backup_id, False, read_data, 0, 0, (failure,), None)
    report = progress or (lambda _p: None)
    failures = _check_snapshot(target, manifest)
    present = {e.key: e.size for e in target.entries(OBJECTS_PREFIX)}
    to_read: dict[str, ManifestObject] = {}
    for obj in manifest.objects:
        found = _object_problem(present, obj)
        if found is not None:
            failures.append(VerifyFailure(obj.object_key, found))
        elif read_data:
            to_read.setdefault(obj.sha256, obj)
    bytes_read = 0
    if read_data:
        bytes_read = _read_objects(target, manifest, to_read, failures, report, workers)
    return VerifyReport(
        backup_id,
        True,
        read_data,
        len(manifest.objects),
        bytes_read,
        tuple(failures),
        manifest,
        seconds=time.monotonic() - started,
    )


def _read_objects(  # noqa: PLR0917  (private helper of verify_backup)
    target: BackupTarget,
    manifest: Manifest,
    to_read: dict[str, ManifestObject],
    failures: list[VerifyFailure],
    report: Callable[[BackupProgress], None],
    workers: int,
) -> int:
    """Hash every object in ``to_read``; name each record object whose bytes differ."""
    corrupt: set[str] = set()
    total, bytes_read = len(to_read), 0
    report(BackupProgress("verify", 0, total, 0))

    def hashed(obj: ManifestObject) -> tuple[ManifestObject, tuple[str, int]]:
        return obj, _sha256_of(target, obj.target_key)

    with closing(bounded_map(hashed, to_read.values(), workers)) as results:
        for done, (obj, (digest, size)) in enumerate(results, 1):
            bytes_read += size
            if digest != obj.sha256:
                corrupt.add(obj.sha256)
            report(BackupProgress("verify", done, total, bytes_read))
    failures.extend(
        VerifyFailure(o.object_key, f"SHA-256 differs from the manifest (corrupt: {o.target_key})")
        for o in manifest.objects
        if o.sha256 in corrupt
    )
    return bytes_read
