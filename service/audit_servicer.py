"""AuditService: the security officer's view of the trail. Reading it is audited too."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from datetime import UTC, datetime

from grpc import aio

from service import convert
from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import audit_pb2_grpc as aupb_grpc
from service.audit.export import chunked, to_csv, to_fhir, to_jsonl
from service.audit.listing import readable
from service.authz import PermissionDeniedError
from service.authz.permissions import ACCESS_BREAK_GLASS
from service.calls import CallState, entered, handled
from service.convert_audit import (
    event_to_pb,
    filter_from_pb,
    opened_note,
    review_item,
    verify_to_pb,
)
from service.guard import AccessGuard
from service.streams import prefetch
from storage import (
    AuditFilter,
    AuditLog,
    BreakGlassReview,
    ChainedEvent,
    Grant,
    InvalidRecordError,
    QueueItem,
    RecordStore,
    VerifyResult,
)

RESTORED = "reviewed (grant row was missing or altered; restored from the trail, expired)"
REPLACED = "reviewed (a review written in the database did not authenticate; replaced)"
SELF_REVIEW = "a principal cannot review their own break-the-glass access; ask another officer"
_EXPORTERS: dict[int, Callable[[Iterable[ChainedEvent]], Iterator[bytes]]] = {
    aupb.EXPORT_FORMAT_JSONL: to_jsonl,
    aupb.EXPORT_FORMAT_CSV: to_csv,
    aupb.EXPORT_FORMAT_FHIR: to_fhir,
}
class AuditServicer(aupb_grpc.AuditServiceServicer):  # type: ignore[misc]  # untyped stub
    """medvault.v1.AuditService."""

    def __init__(self, store: RecordStore, guard: AccessGuard, log: AuditLog) -> None:
        self._store = store
        self._guard = guard
        self._log = log
        # The queue is the trail's break-the-glass events joined with the grant rows.
        self._review_queue = BreakGlassReview(guard.grants, ACCESS_BREAK_GLASS)

    def _filter(
        self, state: CallState, req: aupb.QueryEventsRequest
    ) -> AuditFilter:
        """Enter, build the filter, and commit the audit event of this read of the trail."""
        call = entered(state)
        index = (
            self._store.patient_index(convert.patient_from_pb(req.patient))
            if req.HasField("patient") else None
        )
        flt = filter_from_pb(req, index)
        self._guard.audit(call, "audit-trail", index, outcome="allowed")
        return flt

    def _verify(self, state: CallState) -> VerifyResult:
        call = entered(state)
        self._guard.audit(call, "audit-trail", outcome="allowed")
        return self._guard.trail.verify()

    def _queue(self, state: CallState, everything: bool) -> list[QueueItem]:
        call = entered(state)
        items = self._review_queue.queue(everything)
        # Committed before the reply leaves: reading the sealed reasons and comments is
        # itself an audited disclosure (counts only; the text stays with the grants).
        note = opened_note(item.grant for item in items)
        self._guard.audit(call, "break-glass-queue", outcome="allowed", reason=note)
        return items

    def _review(
        self, state: CallState, req: aupb.ReviewBreakGlassRequest
    ) -> Grant:
        call = entered(state)
        # The target's principal comes from the trail when its row is missing or altered:
        # an edited row must not let the person who broke the glass review it.
        target = self._review_queue.target(req.grant_id)
        grant = target.grant
        if grant.principal == call.principal.name:
            # Four eyes: the review exists to check the person who broke the glass.
            self._guard.audit(
                call, f"grant/{grant.id}", grant.patient_index, outcome="denied",
                status="PERMISSION_DENIED", reason=SELF_REVIEW,
            )
            raise PermissionDeniedError(SELF_REVIEW)
        review = self._review_queue.review_change(
            target, call.principal.name, req.comment, datetime.now(UTC)
        )
        # The comment is kept with the grant; the immutable trail records that it was
        # reviewed, in the same transaction as the review.
        return self._guard.audit_change(
            call, f"grant/{grant.id}", review, grant.patient_index,
            reason=RESTORED if target.flagged else (
                REPLACED if target.forged_review else "reviewed"
            ),
        )

    def _listed(self, flt: AuditFilter) -> Iterator[ChainedEvent]:
        """The events matching ``flt`` that can be shown (``service.audit.listing``)."""
        return readable(self._log.query(flt), self._guard.incidents)

    async def QueryEvents(  # noqa: N802  (gRPC method names)
        self, request: aupb.QueryEventsRequest, context: aio.ServicerContext
    ) -> AsyncIterator[aupb.AuditEvent]:
        """Stream the events matching the filters, oldest first."""
        async with handled(self._guard, context, "QueryEvents") as state:
            flt = await asyncio.to_thread(self._filter, state, request)
            async for event in prefetch(lambda: self._listed(flt), depth=256):
                yield event_to_pb(event)

    async def ExportEvents(  # noqa: N802
        self, request: aupb.ExportEventsRequest, context: aio.ServicerContext
    ) -> AsyncIterator[aupb.ExportChunk]:
        """Stream the matching events as JSON lines, CSV or FHIR AuditEvent (NDJSON)."""
        async with handled(self._guard, context, "ExportEvents") as state:
            exporter = _EXPORTERS.get(request.format)
            if exporter is None:
                raise InvalidRecordError("format", "must be JSONL, CSV or FHIR")
            flt = await asyncio.to_thread(self._filter, state, request.query)
            chunks = prefetch(lambda: chunked(exporter(self._listed(flt))), depth=4)
            async for chunk in chunks:
                yield aupb.ExportChunk(data=chunk)

    async def VerifyChain(  # noqa: N802
        self, request: aupb.VerifyChainRequest, context: aio.ServicerContext
    ) -> aupb.VerifyChainResponse:
        """Walk the chain and the signed checkpoints; name the first bad sequence."""
        async with handled(self._guard, context, "VerifyChain") as state:
            return verify_to_pb(await asyncio.to_thread(self._verify, state))
        raise AssertionError("unreachable")  # pragma: no cover

    async def ListBreakGlass(  # noqa: N802
        self, request: aupb.ListBreakGlassRequest, context: aio.ServicerContext
    ) -> aupb.ListBreakGlassResponse:
        """The break-the-glass review queue (unreviewed first)."""
        async with handled(self._guard, context, "ListBreakGlass") as state:
            items = await asyncio.to_thread(self._queue, state, request.include_reviewed)
            return aupb.ListBreakGlassResponse(
                items=[review_item(i.grant, i.application, i.role) for i in items]
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def ReviewBreakGlass(  # noqa: N802
        self, request: aupb.ReviewBreakGlassRequest, context: aio.ServicerContext
    ) -> aupb.BreakGlassReviewItem:
        """Mark a break-the-glass access reviewed, with a comment."""
        async with handled(self._guard, context, "ReviewBreakGlass") as state:
            state.resource = f"grant/{convert.resource_id(request.grant_id)}"
            grant = await asyncio.to_thread(self._review, state, request)
            return review_item(grant)
        raise AssertionError("unreachable")  # pragma: no cover
