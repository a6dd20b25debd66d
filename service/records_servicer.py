"""RecordService: thin gRPC handlers that translate, call one use case, and reply."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import grpc

from service import convert
from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from service.errors import status_for
from service.identity import caller
from storage.errors import InvalidRecordError
from storage.records import RecordStore

log = logging.getLogger(__name__)


@contextmanager
def _rpc_errors(context: grpc.ServicerContext, rpc: str) -> Iterator[None]:
    """Turn a domain error into the status code of the one table in service.errors."""
    try:
        yield
    except Exception as e:  # noqa: BLE001  (every error leaves as a mapped status)
        code, message = status_for(e)
        log.warning("rpc failed", extra={"rpc": rpc, "code": code.name, "error": type(e).__name__})
        context.abort(code, message)


def _content(requests: Iterator[pb.PutRecordRequest]) -> Iterator[bytes]:
    for request in requests:
        if request.WhichOneof("message") != "chunk":
            raise InvalidRecordError("header", "sent twice; only the first message is a header")
        yield request.chunk


def _pieces(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    for chunk in chunks:
        view = memoryview(chunk)
        for start in range(0, len(view), size):
            yield bytes(view[start : start + size])


class RecordServicer(pb_grpc.RecordServiceServicer):  # type: ignore[misc]  # untyped stub
    """medvault.v1.RecordService over a ``RecordStore``."""

    def __init__(self, store: RecordStore, chunk_size: int) -> None:
        self._store = store
        self._chunk_size = chunk_size

    def PutRecord(  # noqa: N802  (gRPC method names)
        self, request_iterator: Iterator[pb.PutRecordRequest], context: grpc.ServicerContext
    ) -> pb.Record:
        """Store a record streamed as a header then content chunks."""
        with _rpc_errors(context, "PutRecord"):
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("message") != "header":
                raise InvalidRecordError("header", "must be the first message of the stream")
            header = convert.header_from_pb(first.header)
            info = self._store.put(header, _content(request_iterator), caller(context))
            return convert.record_to_pb(info)
        raise AssertionError("unreachable")  # pragma: no cover  (abort raised)

    def GetRecord(  # noqa: N802
        self, request: pb.GetRecordRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetRecordResponse]:
        """Stream the metadata, then the content, each segment only once authenticated."""
        with _rpc_errors(context, "GetRecord"):
            opened = self._store.open(
                request.id, request.version or None, request.range.offset, request.range.length
            )
            yield pb.GetRecordResponse(metadata=convert.record_to_pb(opened.info))
            for piece in _pieces(opened.content, self._chunk_size):
                yield pb.GetRecordResponse(chunk=piece)

    def StatRecord(  # noqa: N802
        self, request: pb.StatRecordRequest, context: grpc.ServicerContext
    ) -> pb.Record:
        """Metadata of one version."""
        with _rpc_errors(context, "StatRecord"):
            return convert.record_to_pb(self._store.stat(request.id, request.version or None))
        raise AssertionError("unreachable")  # pragma: no cover

    def ListRecords(  # noqa: N802
        self, request: pb.ListRecordsRequest, context: grpc.ServicerContext
    ) -> pb.ListRecordsResponse:
        """A page of a patient's records, newest first."""
        with _rpc_errors(context, "ListRecords"):
            records, token = self._store.list(convert.query_from_pb(request))
            return pb.ListRecordsResponse(
                records=[convert.record_to_pb(r) for r in records], next_page_token=token
            )
        raise AssertionError("unreachable")  # pragma: no cover
