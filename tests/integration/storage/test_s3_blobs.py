"""``S3BlobStore`` against a real SeaweedFS: round trips, ranges, failures, outages."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from storage.errors import BackendUnavailableError, RecordNotFoundError
from storage.interfaces import BlobStore
from storage.s3_blobs import MIB
from tests.fixtures.seaweed import S3Bucket, S3Server

pytestmark = pytest.mark.integration


def chunked(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    """``data`` in chunks of ``size`` bytes, as a record stream would arrive."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("size", [0, 1, 5 * MIB + 1], ids=["0B", "1B", "5MiB+1"])
def test_put_then_read_round_trips(s3_bucket: S3Bucket, size: int) -> None:
    store: BlobStore = s3_bucket.store
    data = os.urandom(size)
    assert store.put("rec/obj", chunked(data)) == size
    assert b"".join(store.read("rec/obj")) == data
    assert store.stat("rec/obj").size == size


def test_multipart_object_has_several_parts(s3_bucket: S3Bucket) -> None:
    data = os.urandom(11 * MIB)
    s3_bucket.store.put("big", chunked(data, 1 * MIB))
    etag = s3_bucket.client.stat_object(s3_bucket.name, "big").etag or ""
    assert etag.endswith("-3")  # 5 + 5 + 1 MiB
    assert b"".join(s3_bucket.store.read("big")) == data


def test_ranged_reads(s3_bucket: S3Bucket) -> None:
    data = os.urandom(5 * MIB + 100)
    store = s3_bucket.store
    store.put("obj", chunked(data))
    boundary = 5 * MIB
    assert b"".join(store.read("obj", 10, 20)) == data[10:30]
    assert b"".join(store.read("obj", boundary - 7, 14)) == data[boundary - 7 : boundary + 7]
    assert b"".join(store.read("obj", len(data) - 5)) == data[-5:]
    assert b"".join(store.read("obj", 3, 0)) == b""


def test_stat_delete_and_missing_objects(s3_bucket: S3Bucket) -> None:
    store = s3_bucket.store
    store.put("obj", [b"abc"])
    info = store.stat("obj")
    assert (info.key, info.size) == ("obj", 3)
    assert info.last_modified.tzinfo is not None
    store.delete("obj")
    store.delete("obj")  # absent is not an error
    with pytest.raises(RecordNotFoundError):
        store.stat("obj")
    with pytest.raises(RecordNotFoundError):
        list(store.read("obj"))


def test_list_is_recursive_under_a_prefix(s3_bucket: S3Bucket) -> None:
    store = s3_bucket.store
    for key in ("a/1", "a/b/2", "a/b/c/3", "b/4"):
        store.put(key, [key.encode()])
    assert sorted(i.key for i in store.list("a/")) == ["a/1", "a/b/2", "a/b/c/3"]
    assert {i.key: i.size for i in store.list()} == {
        "a/1": 3,
        "a/b/2": 5,
        "a/b/c/3": 7,
        "b/4": 3,
    }


class SourceError(Exception):
    """The caller's stream failed (e.g. content validation)."""


def test_failed_source_leaves_no_object_and_no_upload(s3_bucket: S3Bucket) -> None:
    def failing() -> Iterator[bytes]:
        yield from chunked(os.urandom(6 * MIB))  # one full part is uploaded first
        raise SourceError("bad content")

    with pytest.raises(SourceError):  # the caller's own error, not a storage error
        s3_bucket.store.put("partial", failing())
    with pytest.raises(RecordNotFoundError):
        s3_bucket.store.stat("partial")
    assert list(s3_bucket.store.list()) == []
    uploads = s3_bucket.client._list_multipart_uploads(s3_bucket.name)
    assert [u.object_name for u in uploads.uploads] == []


def test_outage_is_reported_fast_and_recovers(s3_server: S3Server, s3_bucket: S3Bucket) -> None:
    store = s3_bucket.store
    store.put("before", [b"kept"])
    s3_server.server.stop(timeout=1)  # the filer lingers 15 s on SIGTERM; a kill is an outage too
    try:
        for attempt in (
            lambda: store.put("during", [b"x"]),
            lambda: list(store.read("before")),
            lambda: store.stat("before"),
        ):
            started = time.monotonic()
            with pytest.raises(BackendUnavailableError, match=s3_server.endpoint):
                attempt()
            assert time.monotonic() - started < 10
    finally:
        s3_server.server.start()
    assert s3_server.server.endpoint == s3_server.endpoint
    assert store.put("after", [b"back"]) == 4
    assert b"".join(store.read("before")) == b"kept"
