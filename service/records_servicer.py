"""RecordService: thin gRPC handlers that translate, call one use case, and reply.

The handlers are coroutines on the asyncio server; the guard and the store block
(token, database, S3), so each call's work runs in one worker-thread hop
(``service.streams``), and receiving, encrypting, uploading, reading, decrypting and
sending overlap.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

from grpc import aio
from sqlalchemy.engine import Connection

from service import convert
from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from service.authz import PermissionDeniedError
from service.calls import CallState, entered, handled
from service.guard import NO_GRANT, AccessGuard, Call
from service.limits import UploadGate
from service.streams import SyncRequests, prefetch
from storage import (
    InvalidRecordError,
    NewRecord,
    OpenRecord,
    PatientRef,
    RecordInfo,
    RecordNotFoundError,
    RecordQuery,
    RecordRef,
    RecordStore,
    RowTamperedError,
    StudyMember,
    StudySummary,
)


def _content(requests: Iterator[pb.PutRecordRequest]) -> Iterator[bytes]:
    for request in requests:
        if request.WhichOneof("message") != "chunk":
            raise InvalidRecordError("header", "sent twice; only the first message is a header")
        yield request.chunk


def _cancelled(context: aio.ServicerContext) -> Callable[[], bool]:
    """Whether the call was cancelled, read on the loop: grpc's flag, or (what grpc aio
    1.85 does on a client's cancel, leaving the flag false) its handler task cancelled."""
    task = asyncio.current_task()
    return lambda: bool(context.cancelled()) or (task is not None and task.cancelling() > 0)


async def _at_end(context: aio.ServicerContext) -> bool:
    """Read the request stream once more past its end (``SyncRequests.confirm_live``):
    the end again on a live call; a cancelled call's read is answered only after grpc
    has cancelled the handler."""
    return await context.read() is aio.EOF


def wire_size(request: pb.PutRecordRequest) -> int:
    """What a request message weighs for ``SyncRequests.prefill``: its size on the wire.

    Not ``len(request.chunk)``: a message may carry its bytes elsewhere (unknown fields,
    a second header, refused later by the worker), and weighing those as nothing let
    prefill hold ``PREFILL_MESSAGES`` messages of the largest size grpc accepts.
    """
    return request.ByteSize()


def _pieces(chunks: Iterator[bytes], size: int) -> Iterator[bytes]:
    for chunk in chunks:
        if len(chunk) <= size:
            yield chunk
            continue
        view = memoryview(chunk)
        for start in range(0, len(view), size):
            yield bytes(view[start : start + size])


@contextmanager
def _naming_tampered(state: CallState) -> Iterator[None]:
    """A row that fails verification is audited (by ``handled``) under its own record
    version, also when a list met it."""
    try:
        yield
    except RowTamperedError as e:
        state.resource = e.resource
        raise


class _SkippedError(Exception):
    """An instance of a patient already refused in this GetStudy call."""


class _StudyGate:
    """The read gate of GetStudy: scope checked (and audited) per instance, but a patient
    refused once in the call is refused again without another event for each instance,
    and a member whose row names a refused patient is skipped before it is opened (its
    key is not unwrapped in the token just to be refused)."""

    def __init__(self, guard: AccessGuard, call: Call) -> None:
        self._inner = guard.patient_gate(call)
        self._refused: set[bytes] = set()

    def skips(self, member: StudyMember) -> bool:
        """Whether ``member``'s row names a patient already refused in this call."""
        return member.patient_index in self._refused

    def __call__(self, ref: RecordRef) -> None:
        if ref.patient_index in self._refused:
            raise _SkippedError
        try:
            self._inner(ref)
        except PermissionDeniedError:
            self._refused.add(ref.patient_index)
            raise


class RecordServicer(pb_grpc.RecordServiceServicer):  # type: ignore[misc]  # untyped stub
    """medvault.v1.RecordService over a ``RecordStore``, behind the access guard."""

    def __init__(
        self, store: RecordStore, guard: AccessGuard, chunk_size: int, uploads: UploadGate
    ) -> None:
        self._store = store
        self._guard = guard
        self._chunk_size = chunk_size
        self._uploads = uploads

    # Each _blocking method runs in a worker thread: enter (authenticate, authorize),
    # then one store call whose gates check patient scope and commit the audit event.

    def _put(
        self, state: CallState, header: NewRecord, requests: SyncRequests[pb.PutRecordRequest]
    ) -> RecordInfo:
        call = entered(state)
        commit = self._guard.commit_gate(call)

        def on_commit(ref: RecordRef, insert: Callable[[Connection], None]) -> None:
            # The last moment to learn that the caller went away: the stream's end may
            # have been a cancellation, seen by the handler only now.
            requests.confirm_live()
            commit(ref, insert)

        return self._store.put(
            header,
            _content(requests),
            call.principal.name,
            admit=self._guard.scope_gate(call),
            on_commit=on_commit,
            on_replay=self._guard.replay_gate(call),
        )

    def _open(
        self, state: CallState, request: pb.GetRecordRequest
    ) -> tuple[OpenRecord, list[bytes] | None]:
        """Open the record and fetch its first content while the read's audit event
        commits; nothing is returned, so nothing is sent, before that commit."""
        call = entered(state)
        admission = self._guard.read_admission(call)
        try:
            with _naming_tampered(state):
                opened = self._store.open(
                    request.id,
                    convert.version_from_pb(request.version, "version"),
                    request.range.offset,
                    request.range.length,
                    admit=admission.gate,
                )
            if opened.info.size <= self._chunk_size:  # small: read now, saving a thread hop
                return opened, list(opened.content)
            content = iter(opened.content)
            first = next(content, None)
            head = [] if first is None else [first]
            return replace(opened, content=itertools.chain(head, content)), None
        finally:
            # Also after an error: the allowed event precedes the failure's in the trail.
            admission.wait()

    def _stat(self, state: CallState, request: pb.StatRecordRequest) -> RecordInfo:
        call = entered(state)
        gate = self._guard.patient_gate(call)
        version = convert.version_from_pb(request.version, "version")
        with _naming_tampered(state):
            return self._store.stat(request.id, version, admit=gate)

    def _list(self, state: CallState, query: RecordQuery) -> tuple[list[RecordInfo], str]:
        call = entered(state)
        with _naming_tampered(state):
            return self._store.list(query, admit=self._guard.patient_gate(call))

    def _studies(self, state: CallState, patient: PatientRef) -> list[StudySummary]:
        call = entered(state)
        with _naming_tampered(state):
            return self._store.studies(patient, admit=self._guard.patient_gate(call))

    def _study_members(
        self, state: CallState, study_uid: str
    ) -> tuple[list[StudyMember], _StudyGate]:
        """The study's instances to attempt, and the gate that audits each attempt.

        Instances of patients the caller may not read are left out quietly when some of
        the study is theirs: a writer who files an instance of another patient under a
        study's UID must not put a refusal (and an incident count) in the name of every
        reader of that study. Each instance attempted is still verified (its row names
        its patient under a MAC) and audited by the gate. When none is the caller's,
        all are attempted and the first refusal is audited, as for any read.
        """
        call = entered(state)
        members = self._store.study_members(study_uid)
        readable: dict[bytes, bool] = {}
        for member in members:
            if member.patient_index not in readable:
                readable[member.patient_index] = self._guard.in_scope(call, member.patient_index)
        mine = [m for m in members if readable[m.patient_index]]
        return (mine or members), _StudyGate(self._guard, call)

    def _open_member(
        self, state: CallState, member: StudyMember, gate: _StudyGate
    ) -> OpenRecord | None:
        """The instance opened (verified, in scope, its read audited), or None if the
        caller may not read it (the refusal is audited by the gate)."""
        if gate.skips(member):
            return None
        try:
            with _naming_tampered(state):
                return self._store.open(member.id, member.version, admit=gate)
        except (PermissionDeniedError, _SkippedError):
            return None

    def _chunks(self, opened: OpenRecord) -> Callable[[], Iterator[bytes]]:
        return lambda: _pieces(opened.content, self._chunk_size)

    async def PutRecord(  # noqa: N802  (gRPC method names)
        self, request_iterator: AsyncIterator[pb.PutRecordRequest], context: aio.ServicerContext
    ) -> pb.Record:
        """Store a record streamed as a header then content chunks."""
        async with handled(self._guard, context, "PutRecord") as state:
            first = await anext(request_iterator, None)
            if first is None or first.WhichOneof("message") != "header":
                raise InvalidRecordError("header", "must be the first message of the stream")
            header = convert.header_from_pb(first.header)
            state.resource = f"record/{header.supersedes or 'new'}"
            requests = SyncRequests(
                request_iterator,
                asyncio.get_running_loop(),
                _cancelled(context),
                probe=lambda: _at_end(context),
            )
            # The thread is held while the client streams: a global cap keeps reads served.
            release = self._uploads.acquire()
            # The stream is read ahead on the loop (a record of one chunk whole, a larger
            # one its first chunk) while the worker checks the caller's scope; the worker
            # then takes what is held without a hand-off per message.
            requests.start_prefill(self._chunk_size, wire_size)
            try:
                info = await asyncio.to_thread(self._put, state, header, requests)
            except asyncio.CancelledError:
                requests.abandon()  # the worker runs on: it must not commit
                raise
            finally:
                requests.stop_prefill()
                # The slot is the upload's until its worker stops (a cancelled one may
                # still wait on the store), as the call slot is (service.edge).
                if state.scope is not None:
                    state.scope.after_jobs(release)
                else:
                    release()
            return convert.record_to_pb(info)
        raise AssertionError("unreachable")  # pragma: no cover  (abort raised)

    async def GetRecord(  # noqa: N802
        self, request: pb.GetRecordRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.GetRecordResponse]:
        """Stream the metadata, then the content, each segment only once authenticated."""
        async with handled(self._guard, context, "GetRecord") as state:
            state.resource = f"record/{convert.resource_id(request.id)}"
            opened, whole = await asyncio.to_thread(self._open, state, request)
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
        async with handled(self._guard, context, "StatRecord") as state:
            state.resource = f"record/{convert.resource_id(request.id)}"
            info = await asyncio.to_thread(self._stat, state, request)
            return convert.record_to_pb(info)
        raise AssertionError("unreachable")  # pragma: no cover

    async def ListRecords(  # noqa: N802
        self, request: pb.ListRecordsRequest, context: aio.ServicerContext
    ) -> pb.ListRecordsResponse:
        """A page of a patient's records, newest first."""
        async with handled(self._guard, context, "ListRecords") as state:
            state.resource = "patient-records"
            query = convert.query_from_pb(request)
            records, token = await asyncio.to_thread(self._list, state, query)
            return pb.ListRecordsResponse(
                records=[convert.record_to_pb(r) for r in records], next_page_token=token
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def ListStudies(  # noqa: N802
        self, request: pb.ListStudiesRequest, context: aio.ServicerContext
    ) -> pb.ListStudiesResponse:
        """The patient's imaging studies, newest first."""
        async with handled(self._guard, context, "ListStudies") as state:
            state.resource = "patient-studies"
            if not request.HasField("patient"):
                raise InvalidRecordError("patient", "is required")
            patient = convert.patient_from_pb(request.patient)
            studies = await asyncio.to_thread(self._studies, state, patient)
            return pb.ListStudiesResponse(studies=[convert.study_to_pb(s) for s in studies])
        raise AssertionError("unreachable")  # pragma: no cover

    async def GetStudy(  # noqa: N802
        self, request: pb.GetStudyRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.GetStudyResponse]:
        """Stream every instance of the study the caller may read: each as an instance
        message (its record) then its content chunks."""
        async with handled(self._guard, context, "GetStudy") as state:
            state.resource = f"study/{convert.resource_id(request.study_uid)}"
            members, gate = await asyncio.to_thread(self._study_members, state, request.study_uid)
            if not members:
                raise RecordNotFoundError("no such study")
            sent = 0
            for member in members:
                opened = await asyncio.to_thread(self._open_member, state, member, gate)
                if opened is None:
                    continue
                sent += 1
                yield pb.GetStudyResponse(instance=pb.StudyInstance(
                    record=convert.record_to_pb(opened.info), series_uid=member.series_uid,
                    sop_instance_uid=member.sop_uid,
                ))  # fmt: skip
                async for piece in prefetch(self._chunks(opened), depth=4):
                    yield pb.GetStudyResponse(chunk=piece)
            if not sent:
                raise PermissionDeniedError(NO_GRANT)  # each instance's refusal is audited
