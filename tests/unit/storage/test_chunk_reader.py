"""ChunkReader: the file-like view the minio SDK uploads from (storage.s3_blobs)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.s3_blobs import ChunkReader


@given(
    chunks=st.lists(st.binary(max_size=50), max_size=20),
    sizes=st.lists(st.integers(min_value=1, max_value=120), min_size=1, max_size=30),
)
def test_reads_return_the_stream_in_order_at_most_size_each(
    chunks: list[bytes], sizes: list[int]
) -> None:
    stream = b"".join(chunks)
    reader = ChunkReader(iter(chunks))
    got, at = [], 0
    for size in sizes:
        data = reader.read(size)
        # Exactly size bytes while the stream lasts (the SDK's parts depend on it).
        assert len(data) == min(size, len(stream) - at)
        got.append(data)
        at += len(data)
    got.append(reader.read())  # the rest
    assert b"".join(got) == stream
    assert reader.total == len(stream)
    assert reader.read(10) == b""


def test_the_streams_error_is_remembered_unchanged() -> None:
    failure = ValueError("content")

    def chunks() -> Iterator[bytes]:
        yield b"abc"
        raise failure

    reader = ChunkReader(chunks())
    with pytest.raises(ValueError, match="content") as raised:
        reader.read(10)
    assert raised.value is failure
    assert reader.failure is failure
