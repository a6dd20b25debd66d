"""RecordService: thin gRPC handlers that translate, call one use case, and reply.

The handlers are coroutines on the asyncio server; the store's blocking work runs in
worker threads (``service.streams``), so receiving, encrypting, uploading, reading,
decrypting and sending overlap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

from grpc import aio

from service import convert
from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from service.errors import status_for
from service.identity import caller
from service.streams import SyncRequests, prefetch
from storage.errors import InvalidRecordError
from storage.records import OpenRecord, RecordStore

log = logging.getLogger(__name__)


@asynccontextmanager
async def rpc_errors(context: aio.ServicerContext, rpc: str) -> AsyncIterator[None]:
    """Turn a domain error into the status code of the one table in service.errors."""
    try:
        yield
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001  (every error leaves as a mapped status)
        code, message = status_for(e)
        log.warning("rpc failed", extra={"rpc": rpc, "code": code.name, "error": type(e).__name__})
        await context.abort(code, message)


def _content(requests: Iterator[pb.PutRecordRequest]) -> Iterator[bytes]:
    for request in requests:
        if request.WhichOneof("message") != "chunk":
            raise InvalidRecordError("header", "sent twice; only the first message is a header")
        yield request.chunk


def _pieces(chunks: Iterator[bytes], size: int) -> Iterator[bytes]:
    for chunk in chunks:
        if len(chunk) <= size:
            yield chunk
            continue
        view = memoryview(chunk)
        for start in range(0, len(view), size):
            yield bytes(view[start : start + size])


class RecordServicer(pb_grpc.RecordServiceServicer):  # type: ignore[misc]  # untyped stub
    """medvault.v1.RecordService over a ``RecordStore``."""

    def __init__(self, store: RecordStore, chunk_size: int) -> None:
        self._store = store
        self._chunk_size = chunk_size

    async def PutRecord(  # noqa: N802  (gRPC method names)
        self, request_iterator: AsyncIterator[pb.PutRecordRequest], context: aio.ServicerContext
    ) -> pb.Record:
        """Store a record streamed as a header then content chunks."""
        async with rpc_errors(context, "PutRecord"):
            first = await anext(request_iterator, None)
            if first is None or first.WhichOneof("message") != "header":
                raise InvalidRecordError("header", "must be the first message of the stream")
            header = convert.header_from_pb(first.header)
            requests = SyncRequests(request_iterator, asyncio.get_running_loop())
            info = await asyncio.to_thread(
                self._store.put, header, _content(requests), caller(context)
            )
            return convert.record_to_pb(info)
        raise AssertionError("unreachable")  # pragma: no cover  (abort raised)

    def _open_small(self, request: pb.GetRecordRequest) -> tuple[OpenRecord, list[bytes] | None]:
        """Open the record; read it at once when it fits in one message (one thread hop)."""
        opened = self._store.open(
            request.id, request.version or None, request.range.offset, request.range.length
        )
        if opened.info.size <= self._chunk_size:
            return opened, list(opened.content)
        return opened, None

    async def GetRecord(  # noqa: N802
        self, request: pb.GetRecordRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.GetRecordResponse]:
        """Stream the metadata, then the content, each segment only once authenticated."""
        async with rpc_errors(context, "GetRecord"):
            opened, whole = await asyncio.to_thread(self._open_small, request)
            yield pb.GetRecordResponse(metadata=convert.record_to_pb(opened.info))
            if whole is not None:
                for chunk in whole:
                    yield pb.GetRecordResponse(chunk=chunk)
                return
            pieces = prefetch(lambda: _pieces(opened.content, self._chunk_size), depth=4)
            async for piece in pieces:
                yield pb.GetRecordResponse(chunk=piece)

    async def StatRecord(  # noqa: N802
        self, request: pb.StatRecordRequest, context: aio.ServicerContext
    ) -> pb.Record:
        """Metadata of one version."""
        async with rpc_errors(context, "StatRecord"):
            info = await asyncio.to_thread(self._store.stat, request.id, request.version or None)
            return convert.record_to_pb(info)
        raise AssertionError("unreachable")  # pragma: no cover

    async def ListRecords(  # noqa: N802
        self, request: pb.ListRecordsRequest, context: aio.ServicerContext
    ) -> pb.ListRecordsResponse:
        """A page of a patient's records, newest first."""
        async with rpc_errors(context, "ListRecords"):
            records, token = await asyncio.to_thread(
                self._store.list, convert.query_from_pb(request)
            )
            return pb.ListRecordsResponse(
                records=[convert.record_to_pb(r) for r in records], next_page_token=token
            )
        raise AssertionError("unreachable")  # pragma: no cover
