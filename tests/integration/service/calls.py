"""Small wrappers around RecordService calls, so tests read as what they check."""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc

CHUNK = 256 << 10
TIMEOUT = 60


def header(
    patient: pb.PatientId,
    kind: int = pb.RECORD_KIND_OTHER,
    content_type: str = "application/octet-stream",
    **fields: object,
) -> pb.RecordHeader:
    """A PutRecord header with working defaults."""
    return pb.RecordHeader(patient=patient, kind=kind, content_type=content_type, **fields)


def requests(head: pb.RecordHeader, chunks: Iterable[bytes]) -> Iterator[pb.PutRecordRequest]:
    """The PutRecord stream: the header, then the chunks."""
    yield pb.PutRecordRequest(header=head)
    for chunk in chunks:
        yield pb.PutRecordRequest(chunk=chunk)


def pieces(content: bytes, size: int = CHUNK) -> Iterator[bytes]:
    """``content`` in chunks of ``size`` (one empty chunk for empty content)."""
    if not content:
        return
    for start in range(0, len(content), size):
        yield content[start : start + size]


def put(
    stub: pb_grpc.RecordServiceStub,
    patient: pb.PatientId,
    content: bytes,
    **header_fields: object,
) -> pb.Record:
    """Store ``content`` for ``patient``; returns the stored version."""
    record: pb.Record = stub.PutRecord(
        requests(header(patient, **header_fields), pieces(content)), timeout=TIMEOUT
    )
    return record


@dataclass
class Fetched:
    """What a GetRecord stream delivered before it ended (normally or not)."""

    metadata: pb.Record | None
    content: bytes
    error: grpc.RpcError | None

    def code(self) -> grpc.StatusCode | None:
        """The status the stream ended with (``None`` for OK)."""
        return self.error.code() if self.error is not None else None


def fetch(
    stub: pb_grpc.RecordServiceStub,
    record_id: str,
    version: int = 0,
    offset: int = 0,
    length: int = 0,
) -> Fetched:
    """Read a record (or a range of it), keeping whatever arrived before an error."""
    request = pb.GetRecordRequest(
        id=record_id, version=version, range=pb.ByteRange(offset=offset, length=length)
    )
    metadata: pb.Record | None = None
    content = bytearray()
    try:
        for response in stub.GetRecord(request, timeout=TIMEOUT):
            if response.WhichOneof("message") == "metadata":
                assert metadata is None, "metadata sent twice"
                assert not content, "metadata sent after content"
                metadata = response.metadata
            else:
                content += response.chunk
    except grpc.RpcError as e:
        return Fetched(metadata, bytes(content), e)
    return Fetched(metadata, bytes(content), None)


def get(stub: pb_grpc.RecordServiceStub, record_id: str, version: int = 0, offset: int = 0,
        length: int = 0) -> tuple[pb.Record, bytes]:
    """Read a record that must read cleanly."""
    fetched = fetch(stub, record_id, version, offset, length)
    assert fetched.error is None, f"GetRecord failed with {fetched.code()}"
    assert fetched.metadata is not None, "no metadata message"
    return fetched.metadata, fetched.content


def list_all(stub: pb_grpc.RecordServiceStub, patient: pb.PatientId,
             **query: object) -> list[pb.Record]:
    """Every listed record of ``patient`` (following page tokens)."""
    request = pb.ListRecordsRequest(patient=patient, **query)
    found: list[pb.Record] = []
    for _ in range(1000):
        page = stub.ListRecords(request, timeout=TIMEOUT)
        found.extend(page.records)
        if not page.next_page_token:
            return found
        request.page_token = page.next_page_token
    raise AssertionError("listing did not end")


def rpc_error(call: object, *args: object, **kwargs: object) -> grpc.RpcError:
    """Run ``call(*args, **kwargs)`` and return the RpcError it must raise."""
    try:
        result = call(*args, **kwargs)  # type: ignore[operator]
        if isinstance(result, Iterator):  # a server stream fails when read
            for _ in result:
                pass
    except grpc.RpcError as e:
        return e
    raise AssertionError("the call succeeded but should have failed")


def server_bucket(config_path: Path) -> str:
    """The bucket a server writes to, from its config file."""
    config = tomllib.loads(config_path.read_text())
    bucket: str = config["s3"]["bucket"]
    return bucket


def expect_error(error: grpc.RpcError | None, code: grpc.StatusCode,
                 field: str | None = None) -> None:
    """The call failed with ``code``, and its details name ``field``.

    The message names codes only: details are the server's text and tests print nothing
    that could be patient data, even by accident.
    """
    if error is None:
        raise AssertionError(f"the call succeeded; expected {code.name}")
    if error.code() != code:
        raise AssertionError(f"expected {code.name}, got {error.code().name}")
    if field is not None and field not in (error.details() or ""):
        raise AssertionError(f"{code.name} details do not name the field {field!r}")


def expect_same_record(actual: pb.Record | None, expected: pb.Record) -> None:
    """Two Record messages are equal; a failure names the differing fields only."""
    if actual is None:
        raise AssertionError("no record")
    differing = [f.name for f in pb.Record.DESCRIPTOR.fields
                 if getattr(actual, f.name) != getattr(expected, f.name)]
    if differing:
        raise AssertionError(f"record fields differ: {', '.join(differing)}")


def expect_same_content(actual: bytes, expected: bytes) -> None:
    """Equal bytes; a failure gives sizes and the first differing offset, not the bytes."""
    if actual == expected:
        return
    first = next((i for i, (a, b) in enumerate(zip(actual, expected, strict=False)) if a != b),
                 min(len(actual), len(expected)))
    raise AssertionError(
        f"content differs: got {len(actual)} bytes, expected {len(expected)}; "
        f"first difference at offset {first}"
    )
