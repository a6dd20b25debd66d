"""Where backups go: an S3 bucket (its own endpoint and credentials) or a local directory.

Both hold the same key layout (:mod:`storage.backup.manifest`). Writes are atomic: an
S3 multipart upload is aborted on failure; a directory write goes to a temporary file
that is fsynced and renamed into place. So a key is either absent or complete, which is
what makes "manifest present" mean "backup complete".

S3 Object Lock: when the bucket has Object Lock enabled (it must be created so; S3
cannot turn it on later) and ``lock_days`` > 0, every object is written with a
retention (GOVERNANCE by default) until ``now + lock_days``. SeaweedFS 3.8x supports
this; a bucket without Object Lock is written without retention and
``S3Target.locking`` says so. ``delete`` on a locked bucket only adds a delete marker:
the locked version stays until its retention ends, which is the point.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from minio import Minio
from minio.commonconfig import COMPLIANCE, GOVERNANCE
from minio.error import S3Error
from minio.retention import Retention

from storage.backup import BackupError
from storage.errors import RecordNotFoundError
from storage.s3_blobs import DEFAULT_PART_SIZE, VENDOR_ERRORS, ChunkReader, S3BlobStore

_READ_CHUNK = 1 << 20
_TEMP_PREFIX = ".tmp-"


@dataclass(frozen=True, slots=True)
class TargetEntry:
    """A key in a target with its size and last-modified time."""

    key: str
    size: int
    modified: datetime


class BackupTarget(Protocol):
    """A place that stores backup files under ``/``-separated keys."""

    def put(self, key: str, chunks: Iterable[bytes]) -> int:
        """Write ``key`` atomically from ``chunks``; return the bytes written."""
        ...

    def stat(self, key: str) -> int | None:
        """The size of ``key``, None if absent."""
        ...

    def read(self, key: str) -> Iterator[bytes]:
        """Yield the bytes of ``key``; ``RecordNotFoundError`` if absent."""
        ...

    def list(self, prefix: str) -> Iterator[str]:
        """Every key under ``prefix``, in key order."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; absent is not an error."""
        ...

    def entries(self, prefix: str) -> Iterator[TargetEntry]:
        """Every key under ``prefix`` with size and time (one listing, not a stat each)."""
        ...

    def describe(self) -> str:
        """Where the target is, for messages (no credentials)."""
        ...


def read_all(target: BackupTarget, key: str, limit: int = 256 << 20) -> bytes:
    """The whole of a small file (manifest, signature), refusing more than ``limit``."""
    data = bytearray()
    for chunk in target.read(key):
        data += chunk
        if len(data) > limit:
            raise BackupError(f"{key} is larger than {limit} bytes")
    return bytes(data)


class S3Target:
    """A bucket on any S3 service; Object Lock retention when the bucket has it."""

    def __init__(
        self,
        client: Minio,
        bucket: str,
        *,
        lock_days: int = 0,
        lock_mode: str = GOVERNANCE,
        part_size: int = DEFAULT_PART_SIZE,
    ) -> None:
        if lock_mode not in {GOVERNANCE, COMPLIANCE}:
            raise ValueError("lock_mode must be GOVERNANCE or COMPLIANCE")
        self._client = client
        self._store = S3BlobStore(client, bucket, part_size=part_size)
        self._lock_days = lock_days
        self._lock_mode = lock_mode
        self._part_size = part_size
        self._locking: bool | None = None

    def ensure_bucket(self) -> None:
        """Create the bucket if absent, with Object Lock when retention is configured."""
        bucket = self._store.bucket
        try:
            if not self._client.bucket_exists(bucket):
                self._client.make_bucket(bucket, object_lock=self._lock_days > 0)
        except S3Error as e:
            if e.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise self._store.translate_error("create bucket", e) from e
        except VENDOR_ERRORS as e:
            raise self._store.translate_error("create bucket", e) from e

    @property
    def locking(self) -> bool:
        """Whether objects are written with a retention (configured and supported)."""
        if self._locking is None:
            self._locking = self._lock_days > 0 and self._bucket_has_lock()
        return self._locking

    def _bucket_has_lock(self) -> bool:
        try:
            self._client.get_object_lock_config(self._store.bucket)
        except S3Error as e:
            # Not configured, or a service without Object Lock: write without retention.
            if e.code in {"ObjectLockConfigurationNotFoundError", "NotImplemented"}:
                return False
            raise self._store.translate_error("read object lock configuration", e) from e
        except VENDOR_ERRORS as e:
            raise self._store.translate_error("read object lock configuration", e) from e
        return True

    def put(self, key: str, chunks: Iterable[bytes]) -> int:
        """Stream ``chunks`` into ``key`` (multipart, aborted on failure)."""
        if not self.locking:
            return self._store.put(key, chunks)
        until = datetime.now(UTC) + timedelta(days=self._lock_days)
        reader = ChunkReader(chunks)
        try:
            self._client.put_object(
                self._store.bucket,
                key,
                cast(BinaryIO, reader),
                length=-1,
                part_size=self._part_size,
                num_parallel_uploads=1,
                retention=Retention(self._lock_mode, until),
            )
        except VENDOR_ERRORS as e:
            if reader.failure is e:
                raise
            raise self._store.translate_error("put object", e) from e
        return reader.total

    def stat(self, key: str) -> int | None:
        """Size of ``key``; None if absent."""
        try:
            return self._store.stat(key).size
        except RecordNotFoundError:
            return None

    def read(self, key: str) -> Iterator[bytes]:
        """Yield the bytes of ``key``."""
        return self._store.read(key)

    def list(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix``."""
        return (info.key for info in self._store.list(prefix))

    def entries(self, prefix: str) -> Iterator[TargetEntry]:
        """Keys under ``prefix`` with size and time."""
        for info in self._store.list(prefix):
            yield TargetEntry(info.key, info.size, info.last_modified)

    def delete(self, key: str) -> None:
        """Remove ``key`` (a delete marker when the bucket is locked)."""
        self._store.delete(key)

    def describe(self) -> str:
        """``s3://bucket``."""
        return f"s3://{self._store.bucket}"


class DirectoryTarget:
    """A local directory with the same key layout; atomic, fsynced writes."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root).resolve()

    def ensure(self) -> None:
        """Create the directory (0700: it holds wrapped keys and ciphertext)."""
        self._root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in {"", ".", ".."} for p in parts):
            raise BackupError(f"invalid backup key {key!r}")
        if parts[-1].startswith(_TEMP_PREFIX):
            raise BackupError(f"invalid backup key {key!r}")
        return self._root.joinpath(*parts)

    def put(self, key: str, chunks: Iterable[bytes]) -> int:
        """Write to a temporary file, fsync, rename into place, fsync the directory."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temp = path.with_name(f"{_TEMP_PREFIX}{secrets.token_hex(8)}-{path.name}")
        total = 0
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                    total += len(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return total

    def stat(self, key: str) -> int | None:
        """Size of ``key``; None if absent."""
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def read(self, key: str) -> Iterator[bytes]:
        """Yield the bytes of ``key``."""
        path = self._path(key)
        try:
            f = path.open("rb")
        except FileNotFoundError as e:
            raise RecordNotFoundError(f"no {key} in the backup directory") from e
        with f:
            while chunk := f.read(_READ_CHUNK):
                yield chunk

    def list(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix``."""
        return (entry.key for entry in self.entries(prefix))

    def entries(self, prefix: str) -> Iterator[TargetEntry]:
        """Keys under ``prefix`` in key order; temporary files are not keys."""
        found: list[TargetEntry] = []
        # Walk only the prefix's directory: objects/ may hold millions of files.
        start = self._root.joinpath(*prefix.split("/")[:-1]) if "/" in prefix else self._root
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                if name.startswith(_TEMP_PREFIX):
                    continue
                path = Path(dirpath, name)
                key = path.relative_to(self._root).as_posix()
                if key.startswith(prefix):
                    st = path.stat()
                    found.append(
                        TargetEntry(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))
                    )
        yield from sorted(found, key=lambda e: e.key)

    def delete(self, key: str) -> None:
        """Remove ``key``; absent is not an error."""
        self._path(key).unlink(missing_ok=True)

    def describe(self) -> str:
        """The directory's path."""
        return str(self._root)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX: the directory entry needs its own fsync)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
