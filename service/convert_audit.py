"""Translation of grants, audit events and filters between protobuf and domain objects."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from service._gen.medvault.v1 import access_pb2 as apb
from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import records_pb2 as rpb
from service.convert import timestamp_from_pb
from storage import (
    ALTERED_MARK,
    REASON_UNREADABLE_MARK,
    RESTORED_MARK,
    REVIEW_ALTERED_MARK,
    TAMPERED_MARK,
    AuditFilter,
    ChainedEvent,
    Grant,
    InvalidRecordError,
    Outcome,
    VerifyResult,
)

_OUTCOMES: dict[aupb.Outcome, Outcome] = {
    aupb.OUTCOME_ALLOWED: "allowed",
    aupb.OUTCOME_DENIED: "denied",
    aupb.OUTCOME_FAILED: "failed",
}
_OUTCOME_CODES = {name: code for code, name in _OUTCOMES.items()}
_MARKS = frozenset({
    TAMPERED_MARK, RESTORED_MARK, ALTERED_MARK, REASON_UNREADABLE_MARK, REVIEW_ALTERED_MARK,
})  # fmt: skip


def timestamp(value: datetime | None) -> Timestamp | None:
    """A protobuf timestamp, or None."""
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(UTC))
    return ts


def when(ts: Timestamp, present: bool, field: str) -> datetime | None:
    """A UTC datetime from a timestamp field that may be unset; out of range names ``field``."""
    return timestamp_from_pb(ts, field) if present else None


def grant_to_pb(
    grant: Grant,
    patient: rpb.PatientId | None = None,
    *,
    opened: bool = False,
    altered: bool = False,
) -> apb.Grant:
    """The proto form of a grant; the patient is echoed only when the caller named it.

    The review is filled only when ``opened`` (the security officer's listing, whose
    reason and comment the store opened); otherwise the row's review columns, which
    authenticate only by opening the comment, are not passed on.
    """
    msg = apb.Grant(
        id=grant.id,
        patient_index=grant.patient_index.hex(),
        principal=grant.principal,
        granted_by=grant.granted_by,
        created_at=timestamp(grant.created_at),
        expires_at=timestamp(grant.expires_at),
        revoked_at=timestamp(grant.revoked_at),
        revoked_by=grant.revoked_by or "",
        break_glass=grant.break_glass,
        reason=grant.reason or "",
        altered=altered,
    )
    if opened:
        msg.reviewed_by = grant.reviewed_by or ""
        msg.review_comment = grant.review_comment or ""
        reviewed_at = timestamp(grant.reviewed_at)
        if reviewed_at is not None:
            msg.reviewed_at.CopyFrom(reviewed_at)
    if patient is not None:
        msg.patient.CopyFrom(patient)
    return msg


def event_to_pb(event: ChainedEvent) -> aupb.AuditEvent:
    """The proto form of a chained audit event."""
    entry = event.entry
    return aupb.AuditEvent(
        sequence=event.sequence,
        time=timestamp(entry.time),
        principal=entry.principal,
        application=entry.application,
        role=entry.role,
        action=entry.action,
        resource=entry.resource,
        patient_index=entry.patient_index.hex() if entry.patient_index else "",
        outcome=_OUTCOME_CODES[entry.outcome],
        status=entry.status,
        reason=entry.reason,
        source=entry.source,
        prev_hash=event.prev_hash,
        hash=event.hash,
    )


def filter_from_pb(msg: aupb.QueryEventsRequest, patient_index: bytes | None) -> AuditFilter:
    """The domain filter of a query; the patient arrives already as its blind index."""
    if msg.outcome and msg.outcome not in _OUTCOMES:
        raise InvalidRecordError("outcome", "must be ALLOWED, DENIED or FAILED")
    return AuditFilter(
        since=when(msg.since, msg.HasField("since"), "since"),
        until=when(msg.until, msg.HasField("until"), "until"),
        principal=msg.principal or None,
        patient_index=patient_index,
        action=msg.action or None,
        outcome=_OUTCOMES.get(msg.outcome),
        limit=msg.limit or None,
    )


def verify_to_pb(result: VerifyResult) -> aupb.VerifyChainResponse:
    """The proto form of a verification result."""
    return aupb.VerifyChainResponse(
        ok=result.ok,
        events_checked=result.events_checked,
        checkpoints_checked=result.checkpoints_checked,
        first_bad_sequence=result.first_bad_sequence or 0,
        reason=result.reason,
        last_checkpoint_sequence=result.last_checkpoint_sequence or 0,
    )


def review_item(
    grant: Grant, application: str = "", role: str = ""
) -> aupb.BreakGlassReviewItem:
    """A break-the-glass grant as an item of the review queue (role from its event)."""
    return aupb.BreakGlassReviewItem(
        event=aupb.AuditEvent(
            time=timestamp(grant.created_at),
            principal=grant.principal,
            application=application,
            role=role,
            action="access.break_glass",
            resource=f"grant/{grant.id}",
            patient_index=grant.patient_index.hex(),
            outcome=aupb.OUTCOME_ALLOWED,
            reason=grant.reason or "",
        ),
        grant_id=grant.id,
        reviewed=grant.reviewed_at is not None,
        reviewed_by=grant.reviewed_by or "",
        reviewed_at=timestamp(grant.reviewed_at),
        comment=grant.review_comment or "",
    )


def opened_note(grants: Iterable[Grant]) -> str:
    """The audit reason of a call that showed sealed text: how much of it, never the text.

    Markers the service puts in place of text it would not show are not counted.
    """
    reasons = comments = 0
    for grant in grants:
        reasons += bool(grant.break_glass and grant.reason and grant.reason not in _MARKS)
        comments += bool(grant.review_comment and grant.review_comment not in _MARKS)
    return (
        f"sealed text shown: {reasons} break-the-glass reason{'' if reasons == 1 else 's'}, "
        f"{comments} review comment{'' if comments == 1 else 's'}"
    )
