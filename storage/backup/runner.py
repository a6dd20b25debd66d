"""Run one backup: snapshot, then the objects it references, then the signed manifest.

Order and why:
1. ``runs/<id>.json`` marks the run in progress, written again every few minutes while
   it runs (``storage.backup.run_markers``): ``prune`` leaves the run's snapshot and
   every unreferenced object alone while the marker beats, however long the run.
2. The database snapshot is streamed into the target first. Its ``records`` rows decide
   which objects the backup holds; objects are written before their row and never
   change, so every one of them exists in the source.
3. Each referenced object is copied to ``objects/<sha256>`` unless the target already
   has that key with the right size (incremental; an interrupted run's objects count).
   While copying, the SHA-256 and size are recomputed and a source object that differs
   from its row is refused (the upload is aborted, nothing lands under the key).
4. The manifest, then its signature, are written last: only then is the backup complete.
A run killed at any point leaves no manifest, so it is never taken for a backup.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.engine import Engine

from keystore import Signer
from storage.backup import BackupError, SourceIntegrityError
from storage.backup.manifest import (
    OBJECTS_PREFIX,
    Manifest,
    ManifestObject,
    SnapshotInfo,
    SourceInfo,
    manifest_key,
    new_backup_id,
    run_marker_key,
    sign,
    signature_key,
    snapshot_key,
)
from storage.backup.run_markers import HEARTBEAT, Heartbeat
from storage.backup.snapshot import export
from storage.backup.targets import BackupTarget
from storage.errors import RecordNotFoundError
from storage.interfaces import BlobStore

Clock = Callable[[], datetime]


@dataclass(frozen=True, slots=True)
class BackupProgress:
    """One progress report: ``phase`` is "snapshot", "objects" or "manifest"."""

    phase: str
    done: int
    total: int
    bytes: int


ProgressCallback = Callable[[BackupProgress], None]


@dataclass(frozen=True, slots=True)
class BackupResult:
    """A completed backup: its manifest, and what this run copied."""

    manifest: Manifest

    @property
    def backup_id(self) -> str:
        """The backup's id."""
        return self.manifest.id

    @property
    def counts(self) -> dict[str, int]:
        """The manifest's counts (records, objects, bytes, audit events, ...)."""
        return self.manifest.counts

    @property
    def copied_objects(self) -> int:
        """Objects this run copied (the rest were in the target already)."""
        return self.manifest.copied["objects"]

    @property
    def copied_bytes(self) -> int:
        """Bytes of the objects this run copied."""
        return self.manifest.copied["bytes"]


def source_identity(engine: Engine, bucket: str, endpoint: str) -> SourceInfo:
    """``dialect://host/database`` (no user, no password), bucket, endpoint, this host."""
    url = engine.url
    name = (url.database or "").replace("\\", "/").rsplit("/", 1)[-1]
    host = url.host or "localhost"
    if url.port:
        host = f"{host}:{url.port}"
    database = f"{url.get_backend_name()}://{host}/{name}"
    return SourceInfo(
        database=database, bucket=bucket, endpoint=endpoint, service=socket.gethostname()
    )


def _now() -> datetime:
    return datetime.now(UTC)


def _verified(chunks: Iterable[bytes], obj: ManifestObject) -> Iterator[bytes]:
    """Pass ``chunks`` through, raising before the end if they differ from the row."""
    digest = hashlib.sha256()
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > obj.size:
            break
        digest.update(chunk)
        yield chunk
    if size != obj.size or digest.hexdigest() != obj.sha256:
        # Raised inside the upload: the target aborts it and keeps nothing.
        raise SourceIntegrityError(
            f"source object {obj.object_key} differs from its record's size or SHA-256"
        )


@dataclass
class _Meter:
    digest: hashlib._Hash
    size: int = 0

    def watch(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.size += len(chunk)
            self.digest.update(chunk)
            yield chunk


class _Run:
    """The state of one backup run."""

    def __init__(
        self,
        source: BlobStore,
        target: BackupTarget,
        progress: ProgressCallback | None,
        workers: int,
    ) -> None:
        self.source = source
        self.target = target
        self.progress = progress or (lambda _p: None)
        self.workers = workers
        self.copied_objects = 0
        self.copied_bytes = 0

    def copy_one(self, obj: ManifestObject) -> int:
        return self.target.put(obj.target_key, _verified(self.source.read(obj.object_key), obj))

    def copy_missing(self, objects: list[ManifestObject]) -> None:
        """Copy every object the target lacks (by key and size); refuse corrupt ones."""
        present = {e.key: e.size for e in self.target.entries(OBJECTS_PREFIX)}
        missing = [o for o in objects if present.get(o.target_key) != o.size]
        done, failures = len(objects) - len(missing), []
        self.progress(BackupProgress("objects", done, len(objects), self.copied_bytes))
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            futures: dict[Future[int], ManifestObject] = {
                pool.submit(self.copy_one, o): o for o in missing
            }
            for future in as_completed(futures):
                try:
                    self.copied_bytes += future.result()
                    self.copied_objects += 1
                except (SourceIntegrityError, RecordNotFoundError):
                    failures.append(futures[future].object_key)
                done += 1
                self.progress(BackupProgress("objects", done, len(objects), self.copied_bytes))
        if failures:
            raise SourceIntegrityError(
                f"{len(failures)} source object(s) missing or corrupt, backup not completed: "
                + ", ".join(sorted(failures)[:20])
            )


def run_backup(
    engine: Engine,
    source: BlobStore,
    target: BackupTarget,
    signer: Signer,
    source_info: SourceInfo,
    *,
    trigger: str = "manual",
    progress: ProgressCallback | None = None,
    clock: Clock = _now,
    workers: int = 4,
    heartbeat: timedelta | None = None,
) -> BackupResult:
    """Back up the database and every object it references into ``target``; its run
    marker is written again every ``heartbeat`` (this module's ``HEARTBEAT`` when
    None, read at the call) until the run ends."""
    created = clock()
    backup_id = new_backup_id(created)
    # The marker beats while the run runs, however long (storage.backup.run_markers):
    # a prune beside it keeps this run's snapshot and objects.
    beat = HEARTBEAT if heartbeat is None else heartbeat
    with Heartbeat(target, backup_id, created, clock=clock, interval=beat):
        manifest = _run(
            engine,
            source,
            target,
            signer,
            source_info,
            backup_id=backup_id,
            created=created,
            trigger=trigger,
            progress=progress,
            clock=clock,
            workers=workers,
        )
    target.delete(run_marker_key(backup_id))
    if progress is not None:
        progress(BackupProgress("manifest", 1, 1, manifest.copied["bytes"]))
    return BackupResult(manifest)


def _run(
    engine: Engine, source: BlobStore, target: BackupTarget, signer: Signer,
    source_info: SourceInfo, *, backup_id: str, created: datetime, trigger: str,
    progress: ProgressCallback | None, clock: Clock, workers: int,
) -> Manifest:  # fmt: skip
    """The run of ``run_backup`` under its marker: snapshot, objects, signed manifest."""
    run = _Run(source, target, progress, workers)
    snapshot = export(engine)
    meter = _Meter(hashlib.sha256())
    run.progress(BackupProgress("snapshot", 0, 1, 0))
    target.put(snapshot_key(backup_id), meter.watch(snapshot))
    run.progress(BackupProgress("snapshot", 1, 1, meter.size))
    stats = snapshot.stats
    unique = sorted({o.sha256: o for o in stats.objects}.values(), key=lambda o: o.sha256)
    run.copy_missing(unique)
    # Again, cheaply: a prune that ran meanwhile may have removed an object found present.
    run.copy_missing(unique)
    run.progress(BackupProgress("manifest", 0, 1, run.copied_bytes))
    if not _snapshot_kept(target, backup_id, meter.size):
        # Only a prune that no longer honoured this run's marker (a run past
        # MAX_RUN_AGE), or a target writer, removes it: no manifest of a lost snapshot.
        raise _snapshot_lost(backup_id)
    manifest = Manifest(
        id=backup_id,
        trigger=trigger,
        created_at=created,
        completed_at=clock(),
        source=source_info,
        objects=tuple(sorted(stats.objects, key=lambda o: o.object_key)),
        snapshot=SnapshotInfo(
            key=snapshot_key(backup_id),
            sha256=meter.digest.hexdigest(),
            size=meter.size,
            tables=dict(stats.tables),
        ),
        counts={
            "records": stats.tables.get("records", 0),
            "objects": len(stats.objects),
            "bytes": stats.bytes,
            "audit_events": stats.tables.get("audit_events", 0),
            "signatures": stats.tables.get("record_signatures", 0),
            "grants": stats.tables.get("access_grants", 0),
        },
        audit_head=stats.audit_head,
        copied={"objects": run.copied_objects, "bytes": run.copied_bytes},
    )
    data = manifest.to_bytes()
    target.put(manifest_key(backup_id), [data])
    target.put(signature_key(backup_id), [sign(data, signer)])
    _made_whole(run, unique, backup_id, meter.size)
    return manifest


def _made_whole(run: _Run, objects: list[ManifestObject], backup_id: str, size: int) -> None:
    """After the manifest pair: copy again what a prune took, or withdraw the manifest.

    A prune that did not honour this run's marker (its clock off the pruner's by more
    than ``MAX_AHEAD``, a run past ``MAX_RUN_AGE``) deletes the old objects the run
    found present and did not copy; the snapshot check cannot see that (cold review
    11c). The manifest, complete and the newest, now keeps them from the next prune.
    """
    run.copy_missing(objects)
    if not _snapshot_kept(run.target, backup_id, size):
        for key in (manifest_key(backup_id), signature_key(backup_id)):
            run.target.delete(key)
        raise _snapshot_lost(backup_id)


def _snapshot_kept(target: BackupTarget, backup_id: str, size: int) -> bool:
    """True if the run's snapshot is still in the target, whole (by size)."""
    return target.stat(snapshot_key(backup_id)) == size


def _snapshot_lost(backup_id: str) -> BackupError:
    return BackupError(
        f"the snapshot of run {backup_id} was removed from the target "
        "while the run ran; backup not completed"
    )
