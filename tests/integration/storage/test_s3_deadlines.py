"""The S3 client under a call's deadline (``storage.s3_blobs``; the stalled-store case is
``tests/integration/access/test_deadlines.py``).

Once the call is over no request starts (a read, a write, a listing), a streamed read
stops at its next chunk, and a delete (cleanup of an abandoned write) still runs within
its grace. Without a deadline nothing changes.
"""

from __future__ import annotations

import pytest

from storage import CallDeadline, DeadlineExceededError, RecordNotFoundError, bounded
from tests.fixtures.seaweed import S3Bucket

pytestmark = pytest.mark.integration


def _over() -> CallDeadline:
    deadline = CallDeadline.within(30)
    deadline.stop()
    return deadline


def test_no_request_starts_once_the_call_is_over(s3_bucket: S3Bucket) -> None:
    store = s3_bucket.store
    store.put("objects/a", [b"synthetic " * 100])
    with bounded(_over()):
        with pytest.raises(DeadlineExceededError):
            list(store.read("objects/a"))
        with pytest.raises(DeadlineExceededError):
            store.put("objects/b", [b"synthetic"])
        with pytest.raises(DeadlineExceededError):
            list(store.list())
        store.delete("objects/a")  # cleanup keeps its grace
    with pytest.raises(RecordNotFoundError):
        store.stat("objects/a")
    with pytest.raises(RecordNotFoundError):
        store.stat("objects/b")


def test_a_streamed_read_stops_when_the_call_ends(s3_bucket: S3Bucket) -> None:
    store = s3_bucket.store
    store.put("objects/c", [b"s" * (1 << 20)])  # four chunks of the store's reads
    deadline = CallDeadline.within(30)
    with bounded(deadline):
        chunks = store.read("objects/c")
        first = next(chunks)
        deadline.stop()
        with pytest.raises(DeadlineExceededError):
            next(chunks)
    assert first
    assert sum(len(c) for c in store.read("objects/c")) == 1 << 20  # no deadline: whole
