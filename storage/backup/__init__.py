"""Backups of a medvault deployment: signed manifests, content-addressed objects, snapshots.

The layout in a target and the manifest format are specified in ``docs/operations.md``
and in :mod:`storage.backup.manifest`. This package holds no plaintext path: objects are
copied as ciphertext and the snapshot holds rows exactly as the database does.
"""

from __future__ import annotations

from storage.errors import IntegrityError, StorageError


class BackupError(StorageError):
    """Root of the backup errors."""


class BackupNotFoundError(BackupError):
    """No complete backup (manifest and signature) of that id is in the target."""


class SourceIntegrityError(IntegrityError, BackupError):
    """A source object differs from its row's size or ciphertext SHA-256; not copied."""


class SnapshotLoadError(BackupError):
    """A snapshot cannot be loaded: target not empty, schema revision differs, bad line."""
