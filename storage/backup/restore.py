"""Restore a backup into a deployment: objects back under their keys, then the database.

Every step that can refuse does so before anything is written:

1. the manifest and its signature (:func:`storage.backup.manifest.signature_problem`,
   against the trusted backup key);
2. the snapshot, downloaded once into a spooled temporary file while its SHA-256 and size
   are compared with the manifest;
3. the snapshot's rows, each value of its column's type and each row within the
   schema's constraints (``snapshot.checked_rows``, :mod:`storage.backup.constraints`:
   table and columns or constraint named, never a value), and the master keys: every
   KEK version a snapshot row references must be on the token, or nothing can be
   decrypted afterwards (the missing versions are named);
4. ``before_write`` (``medvault restore``: the snapshot's revoked grants against the
   old deployment's revocation markers, ``service.write_once.MarkerCarry.check_revoked``:
   markers for none of them means the markers are looked for in the wrong place);
5. the target: its database must hold no data and its bucket no object, unless
   ``force`` (then the medvault tables are emptied; other objects are left alone);
6. every object streamed from ``objects/<sha256>`` back to its original ``object_key``,
   its size and SHA-256 recomputed on the way (a mismatch aborts that object's upload);
7. ``before_load`` (``medvault restore``: the grant revocation markers of the
   snapshot's grants carried over under the new record bucket's name,
   ``service.write_once.MarkerCarry``);
8. the snapshot loaded (:func:`storage.backup.snapshot.load`; a row the target's
   database still refuses is named by table and constraint, never by its values), then
   the row count of every table and the objects compared with the manifest.

Objects are copied by ``workers`` threads (:func:`storage.backup.pool.bounded_map`: at
most ``2 x workers`` objects in flight, each streamed, so memory stays bounded whatever
the archive's size). Nothing here decrypts: a restore moves ciphertext and wrapped keys
exactly as backed up. The restore drill (:mod:`storage.backup.drill`) then proves the
result readable, in a scratch place (:mod:`storage.backup.scratch`).
"""

from __future__ import annotations

import hashlib
import secrets
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from storage.backup import BackupError, BackupNotFoundError, snapshot
from storage.backup.manifest import (
    Manifest,
    ManifestObject,
    manifest_key,
    signature_key,
    signature_problem,
)
from storage.backup.pool import bounded_map
from storage.backup.runner import BackupProgress, ProgressCallback
from storage.backup.targets import BackupTarget, read_all
from storage.errors import IntegrityError, RecordNotFoundError, StorageError
from storage.interfaces import BlobStore
from storage.records import OBJECT_PREFIX
from storage.sql_metadata import records, translated

_SPOOL_IN_MEMORY = 8 << 20  # snapshots up to this size never touch the disk
# Which manifest objects a restore copies (the sampled drill copies only its sample).
ObjectFilter = Callable[[ManifestObject], bool]
# The snapshot's ``access_grants`` rows given to ``before_write``, by column name (values
# checked by type).
RevokedRows = Sequence[Mapping[str, Any]]


class RestoreError(BackupError):
    """A restore was refused or failed; the message names what and why."""


class TargetNotEmptyError(RestoreError):
    """The deployment restored into already holds data (use ``force`` to overwrite)."""


class MissingKekError(RestoreError):
    """The token lacks KEK versions the backup's wrapped keys need; nothing was copied."""

    def __init__(self, missing: list[int], token: str) -> None:
        names = ", ".join(f"v{v}" for v in missing)
        super().__init__(
            f"the token {token} lacks master key version(s) {names} that the backup's records "
            "are wrapped with; restore the token from its own backup first (docs/operations.md)"
        )
        self.missing = missing


class BackupCorruptError(RestoreError, IntegrityError):
    """Objects or the snapshot in the target differ from the manifest; each is named."""


class KekInventory(Protocol):
    """The KEK versions on the token (``Pkcs11KeyWrapper`` offers this)."""

    def versions(self) -> list[int]:
        """All KEK versions on the token, oldest first."""
        ...


@dataclass(frozen=True, slots=True)
class Deployment:
    """What a restore writes into: a migrated database and the record bucket."""

    engine: Engine
    blobs: BlobStore


@dataclass(frozen=True, slots=True)
class RestoreFailure:
    """One named problem: which check, which object or record, and what (no content)."""

    check: str
    detail: str
    object_key: str = ""
    record_id: str = ""
    version: int | None = None


@dataclass
class RestoreResult:
    """What was restored, and every problem met on the way."""

    manifest: Manifest
    objects: int = 0
    bytes: int = 0
    tables: dict[str, int] = field(default_factory=dict)
    failures: list[RestoreFailure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return not self.failures


def read_manifest(target: BackupTarget, backup_id: str, trusted_public_key: bytes) -> Manifest:
    """The manifest of a complete backup, after its signature verified under the trusted key."""
    manifest_file = _read_small(target, manifest_key(backup_id))
    signature_file = _read_small(target, signature_key(backup_id))
    if manifest_file is None or signature_file is None:
        raise BackupNotFoundError(f"no complete backup {backup_id} in the target")
    problem = signature_problem(manifest_file, signature_file, trusted_public_key)
    if problem is not None:
        raise BackupCorruptError(f"backup {backup_id}: {problem}")
    manifest = Manifest.from_bytes(manifest_file)
    if manifest.id != backup_id:
        raise BackupCorruptError(f"backup {backup_id}: the manifest names another id")
    return manifest


def _read_small(target: BackupTarget, key: str) -> bytes | None:
    if target.stat(key) is None:
        return None
    return read_all(target, key)


def restore(
    target: BackupTarget,
    backup_id: str,
    into: Deployment,
    *,
    keks: KekInventory,
    token_label: str,
    trusted_public_key: bytes,
    force: bool = False,
    strict: bool = True,
    progress: ProgressCallback | None = None,
    workers: int = 4,
    objects: ObjectFilter | None = None,
    before_load: Callable[[frozenset[str]], object] | None = None,
    before_write: Callable[[RevokedRows], object] | None = None,
    named_grants: Collection[str] = frozenset(),
) -> RestoreResult:
    """Restore backup ``backup_id`` into ``into`` (see the module docstring).

    ``strict`` (a real restore) raises ``BackupCorruptError`` naming every bad object
    before the snapshot is loaded; otherwise (the drill) the good objects are restored,
    the snapshot loaded, and the bad ones listed in ``failures``. ``objects`` restricts
    which objects are copied (the sampled drill copies its sample later); None = all.
    ``before_load`` runs after the objects, before any row is loaded, given the grant
    ids of the snapshot's rows (``medvault restore`` carries the grant revocation
    markers of those grants over there: a restored deployment has no grant row until
    they are in place); the drill passes none. ``before_write`` runs before anything is
    written (before ``force`` empties a table), given the snapshot's revoked grant rows
    and its rows of ``named_grants`` revoked or not (``medvault restore``: the grants
    the old markers name); it refuses by raising (``medvault restore``: the markers must
    be looked for where that deployment kept them).
    """
    report = progress or _no_progress
    manifest = read_manifest(target, backup_id, trusted_public_key)
    with _spooled_snapshot(target, manifest) as spool:
        grant_ids, revoked = _check_keks(
            spool, keks, token_label, keep_revoked=before_write is not None, named=named_grants
        )
        if before_write is not None:
            before_write(revoked)
        _check_empty(into, force)
        result = RestoreResult(manifest)
        chosen = [o for o in manifest.objects if objects is None or objects(o)]
        restore_objects(target, chosen, into.blobs, result, report, workers=workers)
        if strict and result.failures:
            raise BackupCorruptError(
                f"backup {backup_id}: "
                + "; ".join(f"{f.object_key}: {f.detail}" for f in result.failures)
            )
        if before_load is not None:
            before_load(grant_ids)
        report(BackupProgress("snapshot", 0, 1, 0))
        spool.seek(0)
        snapshot.load(into.engine, _chunks(spool))
        report(BackupProgress("snapshot", 1, 1, manifest.snapshot.size))
    result.tables = table_counts(into.engine, list(manifest.snapshot.tables))
    result.failures.extend(compare_tables(manifest, result.tables))
    if strict and result.failures:
        raise RestoreError(
            f"backup {backup_id} restored, but: " + "; ".join(f.detail for f in result.failures)
        )
    return result


def _no_progress(_: BackupProgress) -> None:
    """No progress display."""


@contextmanager
def _spooled_snapshot(target: BackupTarget, manifest: Manifest) -> Iterator[IO[bytes]]:
    """Download the snapshot once, checking its size and SHA-256 against the manifest."""
    info = manifest.snapshot
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as spool:
        digest, size = hashlib.sha256(), 0
        try:
            for chunk in target.read(info.key):
                digest.update(chunk)
                size += len(chunk)
                spool.write(chunk)
        except RecordNotFoundError as e:
            raise BackupCorruptError(f"backup {manifest.id}: snapshot {info.key} is missing") from e
        if size != info.size or not secrets.compare_digest(digest.hexdigest(), info.sha256):
            raise BackupCorruptError(
                f"backup {manifest.id}: snapshot {info.key} differs from the manifest "
                "(size or SHA-256)"
            )
        spool.seek(0)
        yield spool


def _chunks(file: IO[bytes], size: int = 1 << 20) -> Iterator[bytes]:
    while chunk := file.read(size):
        yield chunk


def _check_keks(
    spool: IO[bytes],
    keks: KekInventory,
    token_label: str,
    *,
    keep_revoked: bool = False,
    named: Collection[str] = frozenset(),
) -> tuple[frozenset[str], list[dict[str, Any]]]:
    """Every KEK version the records' wrapped keys name must be on the token; the grant
    ids of the snapshot's rows, and (``keep_revoked``) its grant rows that are revoked
    or ``named``, read in the same pass (a row is a few hundred bytes: kept in memory)."""
    # The snapshot's own reader (one pass over the spooled file, rows not kept), every
    # row checked by type as the load will: a kek_version of another type is refused
    # naming table and column, never int() of it with its value in the error.
    rows = (line for line in snapshot.decoded_lines(_chunks(spool)) if line[0] != snapshot.ALEMBIC)
    needed: set[int] = set()
    grant_ids: set[str] = set()
    revoked: list[dict[str, Any]] = []
    for table, row in snapshot.checked_rows(rows):
        if table.name == "records":
            needed.add(row["kek_version"])
        elif table.name == "access_grants":
            grant_ids.add(row["id"])
            if keep_revoked and (row["revoked_at"] is not None or row["id"] in named):
                revoked.append(row)
    spool.seek(0)
    missing = sorted(needed - set(keks.versions()))
    if missing:
        raise MissingKekError(missing, token_label)
    return frozenset(grant_ids), revoked


# Tables whose rows are a deployment's data: any row there and the target is not empty.
# (``kek_versions`` and ``audit_head`` are filled by a fresh service start and migration.)
_DATA_TABLES = ("records", "record_signatures", "access_grants", "audit_events")


def _check_empty(into: Deployment, force: bool) -> None:
    """Refuse a deployment with data (any row or any object) unless ``force``."""
    populated = [name for name, n in table_counts(into.engine, list(_DATA_TABLES)).items() if n]
    has_objects = next(iter(into.blobs.list()), None) is not None
    if force:
        _clear(into.engine)
        return
    if populated or has_objects:
        where = [f"database tables {', '.join(populated)}"] if populated else []
        where += ["the bucket"] if has_objects else []
        raise TargetNotEmptyError(
            f"the deployment restored into is not empty ({' and '.join(where)} hold data); "
            "restore only into a new deployment, or pass --force to overwrite it"
        )


def _clear(engine: Engine) -> None:
    """Delete every row of the medvault tables, children first (``force`` only)."""
    with translated(engine), engine.begin() as connection:
        for table in reversed(snapshot.tables()):
            connection.execute(table.delete())


def restore_objects(
    target: BackupTarget,
    objects: Sequence[ManifestObject],
    blobs: BlobStore,
    result: RestoreResult,
    report: ProgressCallback,
    *,
    workers: int = 4,
) -> None:
    """Stream ``objects`` back under their original keys, ``workers`` at a time; name
    each that is missing or fails its digest (in ``result.failures``, manifest order)."""
    total = len(objects)
    report(BackupProgress("objects", 0, total, 0))
    copy = _copier(target, blobs)
    with closing(bounded_map(copy, objects, workers)) as results:
        for done, (obj, written, failure) in enumerate(results, 1):
            if failure is not None:
                result.failures.append(RestoreFailure("object", failure, obj.object_key))
            else:
                result.objects += 1
                result.bytes += written
            report(BackupProgress("objects", done, total, result.bytes))


_Copied = tuple[ManifestObject, int, str | None]  # (object, bytes written, failure)


def _copier(target: BackupTarget, blobs: BlobStore) -> Callable[[ManifestObject], _Copied]:
    def copy(obj: ManifestObject) -> _Copied:
        if not obj.object_key.startswith(OBJECT_PREFIX):
            return obj, 0, "not a record object key"
        try:
            return obj, blobs.put(obj.object_key, _verified(target.read(obj.target_key), obj)), None
        except _ObjectMismatchError as e:
            return obj, 0, str(e)
        except RecordNotFoundError:
            return obj, 0, f"missing from the backup ({obj.target_key})"

    return copy


class _ObjectMismatchError(StorageError):
    """An object's bytes in the target differ from the manifest (raised mid-stream)."""


def _verified(chunks: Iterable[bytes], obj: ManifestObject) -> Iterator[bytes]:
    """Pass ``chunks`` through, raising at the end if size or SHA-256 differ.

    The raise happens when the uploader asks for more after the last chunk, before it
    completes the upload, so a corrupt object never appears under its key.
    """
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
        if size > obj.size:
            raise _ObjectMismatchError(f"larger than the manifest's {obj.size} bytes")
        yield chunk
    if size != obj.size:
        raise _ObjectMismatchError(f"{size} bytes, the manifest says {obj.size}")
    if not secrets.compare_digest(digest.hexdigest(), obj.sha256):
        raise _ObjectMismatchError(f"SHA-256 differs from the manifest ({obj.target_key})")


def table_counts(engine: Engine, tables: list[str]) -> dict[str, int]:
    """Row count of each named table (tables of the medvault schema only)."""
    counts: dict[str, int] = {}
    with translated(engine), engine.connect() as connection:
        for name in tables:
            table = sa.table(name)  # names come from the schema list, never from input
            counts[name] = int(
                connection.scalar(sa.select(sa.func.count()).select_from(table)) or 0
            )
    return counts


def compare_tables(manifest: Manifest, restored: dict[str, int]) -> list[RestoreFailure]:
    """Every table whose restored row count differs from the manifest's."""
    return [
        RestoreFailure("count", f"table {name}: {restored.get(name, 0)} rows, manifest {n}")
        for name, n in sorted(manifest.snapshot.tables.items())
        if restored.get(name, 0) != n
    ]


def record_count(engine: Engine) -> int:
    """Rows of ``records`` (every version)."""
    with translated(engine), engine.connect() as connection:
        return int(connection.scalar(sa.select(sa.func.count()).select_from(records)) or 0)
