"""AccessService: care-team grants, break-the-glass and WhoAmI, each call audited."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from grpc import aio

from service import convert
from service._gen.medvault.v1 import access_pb2 as apb
from service._gen.medvault.v1 import access_pb2_grpc as apb_grpc
from service.authz import PermissionDeniedError
from service.authz.permissions import AUDIT_REVIEW
from service.calls import CallState, entered, handled
from service.convert_audit import grant_to_pb, opened_note, when
from service.guard import AccessGuard, Call
from storage import Grant, InvalidRecordError, RecordStore

SELF_GRANT = "a principal cannot grant itself access; use break-the-glass (reviewed)"


def _now() -> datetime:
    return datetime.now(UTC)


class AccessServicer(apb_grpc.AccessServiceServicer):  # type: ignore[misc]  # untyped stub
    """medvault.v1.AccessService."""

    def __init__(self, store: RecordStore, guard: AccessGuard) -> None:
        self._store = store
        self._guard = guard

    def _patient_index(self, request: apb.GrantAccessRequest | apb.BreakGlassRequest) -> bytes:
        if not request.HasField("patient"):
            raise InvalidRecordError("patient", "is required")
        return self._store.patient_index(convert.patient_from_pb(request.patient))

    def _create(self, call: Call, grant: Grant, reason: str) -> Grant:
        """Store a new grant and its audit event in one transaction, or neither."""
        return self._guard.audit_change(
            call, f"grant/{grant.id}", self._guard.grants.insert_change(grant),
            grant.patient_index, reason=reason,
        )  # fmt: skip

    def _grant(self, state: CallState, req: apb.GrantAccessRequest) -> Grant:
        call = entered(state)
        if req.principal == call.principal.name:
            # Granting oneself would be silent access without review: break-the-glass is
            # the reviewed way to reach a patient outside one's care team.
            self._guard.audit(
                call, "grant/new", outcome="denied", status="PERMISSION_DENIED",
                reason=SELF_GRANT,
            )
            raise PermissionDeniedError(SELF_GRANT)
        grant = self._guard.grants.new_grant(
            self._patient_index(req), req.principal, call.principal.name,
            when(req.expires_at, req.HasField("expires_at"), "expires_at"), _now(),
        )
        return self._create(call, grant, f"granted to {req.principal}")

    def _break_glass(
        self, state: CallState, req: apb.BreakGlassRequest
    ) -> Grant:
        call = entered(state)
        limit = self._guard.policy.current.break_glass.max_seconds
        seconds = req.duration_seconds or limit
        if seconds > limit:
            raise InvalidRecordError("duration_seconds", f"must be at most {limit} (policy)")
        grant = self._guard.grants.new_break_glass(
            self._patient_index(req), call.principal.name, req.reason,
            timedelta(seconds=seconds), _now(),
        )
        # The free-text reason stays with the grant (review queue), not in the immutable,
        # exported trail: it may name the patient.
        return self._create(call, grant, "break-the-glass (reason with the grant, for review)")

    def _revoke(self, state: CallState, grant_id: str) -> Grant:
        call = entered(state)
        grants = self._guard.grants
        # Read first for the event's patient; the revocation itself (conditional, with
        # its event in one transaction) decides whether it happens.
        patient_index = grants.get(grant_id).patient_index
        revoke = grants.revoke_change(grant_id, call.principal.name, _now())
        return self._guard.audit_change(call, f"grant/{grant_id}", revoke, patient_index)

    def _list(
        self, state: CallState, req: apb.ListGrantsRequest
    ) -> list[apb.Grant]:
        call = entered(state)
        index = (
            self._store.patient_index(convert.patient_from_pb(req.patient))
            if req.HasField("patient") else None
        )
        echo = req.patient if req.HasField("patient") else None
        grants = self._guard.grants
        principal = req.principal or None
        if not self._officer(call):
            self._guard.audit(call, "grants", index, outcome="allowed")
            listed = grants.list(index, principal, req.include_inactive, _now())
            return [grant_to_pb(g, echo) for g in listed]
        # A security officer (audit.review) sees the sealed reasons and reviews, opened
        # here in the service; the event, committed before the reply, says how many.
        opened = grants.list_opened(index, principal, req.include_inactive, _now())
        note = opened_note(g for g, altered in opened if not altered)
        self._guard.audit(call, "grants", index, outcome="allowed", reason=note)
        return [grant_to_pb(g, echo, opened=True, altered=a) for g, a in opened]

    def _officer(self, call: Call) -> bool:
        """Whether the caller may read break-the-glass reasons and review comments."""
        permissions = self._guard.policy.current.permissions_for(call.principal.roles)
        return AUDIT_REVIEW in permissions

    def _whoami(self, state: CallState) -> apb.WhoAmIResponse:
        call = entered(state)
        self._guard.audit(call, "whoami", outcome="allowed")
        principal = call.principal
        permissions = self._guard.policy.current.permissions_for(principal.roles)
        return apb.WhoAmIResponse(
            principal=principal.name,
            application=principal.application or "",
            roles=sorted(principal.roles),
            permissions=sorted(permissions),
        )

    async def GrantAccess(  # noqa: N802  (gRPC method names)
        self, request: apb.GrantAccessRequest, context: aio.ServicerContext
    ) -> apb.Grant:
        """Give a principal access to a patient's records (care team)."""
        async with handled(self._guard, context, "GrantAccess") as state:
            grant = await asyncio.to_thread(self._grant, state, request)
            return grant_to_pb(grant, request.patient)
        raise AssertionError("unreachable")  # pragma: no cover

    async def RevokeAccess(  # noqa: N802
        self, request: apb.RevokeAccessRequest, context: aio.ServicerContext
    ) -> apb.Grant:
        """End a grant now."""
        async with handled(self._guard, context, "RevokeAccess") as state:
            state.resource = f"grant/{convert.resource_id(request.grant_id)}"
            grant = await asyncio.to_thread(self._revoke, state, request.grant_id)
            return grant_to_pb(grant)
        raise AssertionError("unreachable")  # pragma: no cover

    async def ListGrants(  # noqa: N802
        self, request: apb.ListGrantsRequest, context: aio.ServicerContext
    ) -> apb.ListGrantsResponse:
        """Grants of a patient or of a principal."""
        async with handled(self._guard, context, "ListGrants") as state:
            grants = await asyncio.to_thread(self._list, state, request)
            return apb.ListGrantsResponse(grants=grants)
        raise AssertionError("unreachable")  # pragma: no cover

    async def BreakGlass(  # noqa: N802
        self, request: apb.BreakGlassRequest, context: aio.ServicerContext
    ) -> apb.Grant:
        """Time-limited emergency access with a mandatory reason, queued for review."""
        async with handled(self._guard, context, "BreakGlass") as state:
            grant = await asyncio.to_thread(self._break_glass, state, request)
            return grant_to_pb(grant, request.patient)
        raise AssertionError("unreachable")  # pragma: no cover

    async def WhoAmI(  # noqa: N802
        self, request: apb.WhoAmIRequest, context: aio.ServicerContext
    ) -> apb.WhoAmIResponse:
        """The caller as the service sees it: principal, application, roles, permissions."""
        async with handled(self._guard, context, "WhoAmI") as state:
            return await asyncio.to_thread(self._whoami, state)
        raise AssertionError("unreachable")  # pragma: no cover
