"""``BlobStore`` over S3 (SeaweedFS, MinIO or any S3 service) with the minio SDK.

Vendor errors are translated here and nowhere else: unreachable or failing service ->
``BackendUnavailableError``, missing object -> ``RecordNotFoundError``, anything else
-> ``StorageError``. Messages name the endpoint and the operation, never a key's data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, TypeVar, cast

import urllib3
from minio import Minio
from minio.commonconfig import Tags
from minio.error import InvalidResponseError, S3Error, ServerError

from storage.deadlines import GRACE_SECONDS, check_deadline, time_left
from storage.errors import (
    BackendUnavailableError,
    DeadlineExceededError,
    RecordNotFoundError,
    StorageError,
)
from storage.interfaces import BlobInfo

MIB = 1024 * 1024
# 8 MiB parts allow 80 GiB objects (10,000 parts), far above the record limit, and keep
# an upload's memory (the SDK holds about two parts) well under 100 MiB.
DEFAULT_PART_SIZE = 8 * MIB
_MIN_PART_SIZE = 5 * MIB  # the S3 minimum for every part but the last
_READ_CHUNK = 256 * 1024
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NoSuchVersion"})
# The object tag that says a record row committed over the object (the sweeper never
# deletes such an object). It names nothing about the record.
COMMITTED_TAG = ("medvault-committed", "1")

T = TypeVar("T")

# What the SDK and its transport raise; anything else is a bug and propagates as is.
# Public: the other storage modules that talk to the SDK directly catch the same set.
VENDOR_ERRORS = (
    S3Error,
    ServerError,
    InvalidResponseError,
    urllib3.exceptions.HTTPError,
    OSError,
    ValueError,
)


_CONNECT_TIMEOUT = 2.0


class _DeadlineRetry(urllib3.Retry):
    """The configured retries, but none once the call's deadline has passed."""

    def is_exhausted(self) -> bool:
        """Out of retries, or of the call's time."""
        return super().is_exhausted() or time_left() == 0.0


class _DeadlinePool(urllib3.PoolManager):
    """The HTTP pool of the minio client, bounding each request by the call's deadline.

    The minio SDK takes no per-request timeout; it sends every request through this
    pool, in the thread that works for the call (``storage.deadlines``). A request gets
    the configured timeouts or the time the call has left, whichever is shorter; once
    none is left, no request starts. A DELETE (aborting a failed multipart upload,
    removing a failed write's object) gets a short grace past the deadline, so that an
    abandoned write leaves no parts behind when the store answers.
    """

    def __init__(self, *, connect: float, read: float, **kw: Any) -> None:
        super().__init__(timeout=urllib3.Timeout(connect=connect, read=read), **kw)
        self._connect = connect
        self._read = read

    def urlopen(  # type: ignore[override]  # same signature as the base
        self, method: str, url: str, redirect: bool = True, **kw: Any
    ) -> urllib3.BaseHTTPResponse:
        """The base's ``urlopen`` with the call's deadline applied."""
        left = time_left()
        if left is not None:
            if method == "DELETE":
                left = max(left, GRACE_SECONDS)
            elif left == 0.0:
                check_deadline("an object store request")
            kw.setdefault(
                "timeout",
                urllib3.Timeout(connect=min(self._connect, left), read=min(self._read, left)),
            )
        return super().urlopen(method, url, redirect, **kw)


def make_minio_client(
    endpoint: str,
    access_key: str,
    secret_key: str,
    secure: bool = False,
    ca_file: str | None = None,
    *,
    read_timeout: float = 30.0,
    retry: bool = True,
) -> Minio:
    """A minio client whose HTTP pool reports an outage within seconds, not minutes.

    The SDK's default pool waits five minutes to connect and retries five times; a
    record write would hang that long when the object store is down. A probe (is the
    server up yet?) passes a short ``read_timeout`` and ``retry=False``. Within a call,
    each request is bounded by the call's deadline too (``_DeadlinePool``).
    """
    retries = _DeadlineRetry(
        total=2, connect=1, read=1, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
    ) if retry else False  # fmt: skip
    http = _DeadlinePool(
        connect=_CONNECT_TIMEOUT,
        read=read_timeout,
        maxsize=10,
        cert_reqs="CERT_REQUIRED" if secure else "CERT_NONE",
        ca_certs=ca_file,
        retries=retries,
    )
    # A fixed region spares a GetBucketLocation round trip before the first request.
    return Minio(
        endpoint,
        access_key=access_key,
        secret_key=secret_key,
        secure=secure,
        region="us-east-1",
        http_client=http,
    )


def _bound_next_read(response: urllib3.BaseHTTPResponse) -> None:
    """Stop a streamed read once the call is over, and wait for the next bytes of the
    body no longer than the call has left (the request's read timeout was fixed when
    it was sent)."""
    left = time_left()
    if left is None:
        return
    check_deadline("the next read of an object")
    sock = getattr(response.connection, "sock", None)
    current = sock.gettimeout() if sock is not None else None
    if sock is not None and (current is None or current > left):
        sock.settimeout(left)


class ChunkReader:
    """A read()-able view of a chunk iterator that buffers at most one request's worth.

    The minio SDK uploads from a file-like object; ``S3BlobStore.put`` and the backup
    target's locked writes (``storage.backup.targets``) hand it one of these.

    An exception from the iterator is remembered so ``put`` re-raises it unchanged:
    it is the caller's error (e.g. invalid content), not the object store's.
    """

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        # The chunks not handed out yet, as received: joined once per read, so a part
        # is copied once (no growing buffer, whose spare capacity outlived the read).
        self._pending: list[bytes] = []
        self._pending_size = 0
        self.total = 0
        self.failure: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        """Return up to ``size`` bytes (all remaining if negative); b"" at the end."""
        try:
            while size < 0 or self._pending_size < size:
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                if chunk:
                    self._pending.append(chunk)
                    self._pending_size += len(chunk)
        except BaseException as e:
            self.failure = e
            raise
        if size < 0 or self._pending_size <= size:
            data = b"".join(self._pending)
            self._pending = []
        else:  # the last chunk straddles the cut: its rest waits for the next read
            taken, rest, count = 0, b"", 0
            for count, chunk in enumerate(self._pending, start=1):  # noqa: B007
                if taken + len(chunk) >= size:
                    head, rest = chunk[: size - taken], chunk[size - taken :]
                    break
                taken += len(chunk)
            data = b"".join([*self._pending[: count - 1], head])
            self._pending = [rest, *self._pending[count:]] if rest else self._pending[count:]
        self._pending_size -= len(data)
        self.total += len(data)
        return data


class S3BlobStore:
    """Objects in one bucket; multipart uploads, ranged reads."""

    def __init__(self, client: Minio, bucket: str, part_size: int = DEFAULT_PART_SIZE) -> None:
        if part_size < _MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {_MIN_PART_SIZE} bytes")
        self._client = client
        self._bucket = bucket
        self._part_size = part_size

    @property
    def bucket(self) -> str:
        """The bucket this store writes to."""
        return self._bucket

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet."""

        def create() -> None:
            if not self._client.bucket_exists(self._bucket):
                try:
                    self._client.make_bucket(self._bucket)
                except S3Error as e:
                    # Another replica may have created it between the two calls.
                    if e.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                        raise

        self._call("create bucket", create)

    def put(self, key: str, chunks: Iterable[bytes]) -> int:
        """Stream ``chunks`` into ``key``; memory stays at about one part.

        The SDK aborts the multipart upload when any part (or the source) fails, so
        nothing becomes visible under ``key``.
        """
        reader = ChunkReader(chunks)
        try:
            self._client.put_object(
                self._bucket,
                key,
                cast(BinaryIO, reader),  # the SDK only calls read(size)
                length=-1,
                part_size=self._part_size,
                # Parallel uploads would hold several parts in memory at once.
                num_parallel_uploads=1,
            )
        except VENDOR_ERRORS as e:
            if reader.failure is e:
                raise  # the caller's stream failed: its error, unchanged
            raise self.translate_error("put object", e) from e
        return reader.total

    def read(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Yield the object's bytes from ``offset``; the response is always released."""
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        if length == 0:
            return
        response = self._call(
            "read object",
            lambda: self._client.get_object(self._bucket, key, offset=offset, length=length or 0),
        )
        try:
            while True:
                _bound_next_read(response)
                chunk = self._call("read object", lambda: response.read(_READ_CHUNK))
                if not chunk:
                    return
                yield chunk
        finally:
            response.close()
            response.release_conn()

    def stat(self, key: str) -> BlobInfo:
        """Size and last-modified time of ``key``; ``RecordNotFoundError`` if absent."""
        info = self._call("stat object", lambda: self._client.stat_object(self._bucket, key))
        if info.last_modified is None or info.size is None:
            raise StorageError(f"object store at {self._endpoint()} returned no size or time")
        return BlobInfo(key=key, size=info.size, last_modified=info.last_modified)

    def delete(self, key: str) -> None:
        """Remove ``key``; an absent object is not an error (S3 semantics)."""
        self._call("delete object", lambda: self._client.remove_object(self._bucket, key))

    def mark_committed(self, key: str) -> None:
        """Tag ``key`` as a committed record's object (replaces its tags; we set no other)."""
        tags = Tags.new_object_tags()
        tags[COMMITTED_TAG[0]] = COMMITTED_TAG[1]
        self._call("tag object", lambda: self._client.set_object_tags(self._bucket, key, tags))

    def committed(self, key: str) -> bool:
        """Whether ``key`` carries the committed tag; ``RecordNotFoundError`` if absent."""
        tags = self._call(
            "read object tags", lambda: self._client.get_object_tags(self._bucket, key)
        )
        return tags is not None and tags.get(COMMITTED_TAG[0]) == COMMITTED_TAG[1]

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        """Every object under ``prefix``, recursively, in key order."""
        objects = self._call(
            "list objects",
            lambda: iter(self._client.list_objects(self._bucket, prefix=prefix, recursive=True)),
        )
        while True:
            obj = self._call("list objects", lambda: next(objects, None))
            if obj is None:
                return
            if obj.is_dir or obj.object_name is None or obj.last_modified is None:
                continue
            yield BlobInfo(key=obj.object_name, size=obj.size or 0, last_modified=obj.last_modified)

    # -- error translation -----------------------------------------------------

    def _endpoint(self) -> str:
        # The public URL of the client, e.g. "127.0.0.1:8333"; it names no object.
        return str(self._client._base_url.host)  # no public accessor

    def _call(self, operation: str, fn: Callable[[], T]) -> T:
        """Run one SDK call, translating its errors."""
        try:
            return fn()
        except VENDOR_ERRORS as e:
            raise self.translate_error(operation, e) from e

    def translate_error(self, operation: str, error: BaseException) -> StorageError:
        """Map one SDK or transport error to the storage error hierarchy.

        Public for code that calls the SDK on this store's bucket itself (the backup
        target's Object Lock calls), so every S3 error reads the same.
        """
        if time_left() == 0.0 and not isinstance(error, S3Error):
            # A timeout, or no retry, because the call's time ran out: not an outage.
            return DeadlineExceededError(
                f"the call's deadline passed during an object store request ({operation})"
            )
        return self._translate_vendor(operation, error)

    def _translate_vendor(self, operation: str, error: BaseException) -> StorageError:
        where = self._endpoint()
        if isinstance(error, S3Error):
            if error.code in _NOT_FOUND_CODES:
                return RecordNotFoundError(f"no such object in bucket {self._bucket}")
            if error.code == "NoSuchBucket":
                return StorageError(f"bucket {self._bucket} does not exist at {where}")
            if error.response.status >= 500:
                return BackendUnavailableError(
                    f"object store unreachable at {where}: {operation} failed "
                    f"({error.code}); retry later"
                )
            return StorageError(f"object store at {where} refused to {operation}: {error.code}")
        if isinstance(error, ServerError | urllib3.exceptions.HTTPError | OSError):
            return BackendUnavailableError(
                f"object store unreachable at {where}: {operation} failed "
                f"({type(error).__name__}); retry later"
            )
        return StorageError(f"object store at {where}: {operation} failed ({type(error).__name__})")
