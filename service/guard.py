"""Authentication, authorization, patient scope and the audit event of every call.

Each RPC passes through ``AccessGuard.enter`` (who is calling, may their roles call
this?) and, for patient data, a gate that checks the care-team grant and commits the
audit event before anything is released (docs/architecture.md, read path step 1;
GetRecord fetches while the event commits, ``ReadAdmission``; SignRecord commits it
with the signature, in one transaction, ``SigningAdmission``). Denials and
failures are audited too. Everything here blocks (token, database), so servicers call
it from worker threads; the one exception is ``admit``, which reads memory only, so the
edge runs it on the event loop and hops to a thread only to audit a refusal.

The call types are ``service.call_facts``'s, the admissions ``service.admissions``'s;
both are re-exported here, where the servicers import them with the guard.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NoReturn, TypeVar

from service.admissions import ReadAdmission, SigningAdmission
from service.audit.trail import AuditTrail
from service.authn import AuthenticationError, Authenticator, Principal
from service.authz import PermissionDeniedError
from service.authz.policy import PolicyHolder
from service.call_facts import (
    Call,
    CallFacts,
    Refusal,
    presenting_application,
    record_resource,
    source_host,
)
from service.incidents import IncidentDetector
from storage import AuditEntry, Change, CommitGate, Gate, Outcome, RecordRef, SqlGrantStore

__all__ = [
    "NO_GRANT",
    "REPLAY_REASON",
    "AccessGuard",
    "Call",
    "CallFacts",
    "ReadAdmission",
    "Refusal",
    "SigningAdmission",
    "presenting_application",
    "record_resource",
    "source_host",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
NO_GRANT = "no active care-team grant or break-the-glass access for this patient"
# A PutRecord retried with its request id: the version named was stored by the first put.
REPLAY_REASON = "retry of an earlier put (same request id): its version returned, nothing stored"


class AccessGuard:
    """The policy enforcement point shared by every servicer."""

    def __init__(
        self,
        policy: PolicyHolder,
        authenticator: Authenticator,
        # The SQL store, not the GrantStore role: the officer's review queue
        # (storage.break_glass) is built from it and needs its database (issue #9).
        grants: SqlGrantStore,
        trail: AuditTrail,
        incidents: IncidentDetector,
    ) -> None:
        self.policy = policy
        self._authn = authenticator
        self.grants = grants
        self.trail = trail
        self._incidents = incidents

    @property
    def incidents(self) -> IncidentDetector:
        """The incident detector (the record store reports tampered rows to it)."""
        return self._incidents

    def enter(self, facts: CallFacts) -> Call:
        """Authenticate and authorize ``facts``; denials are audited, then raised."""
        admitted = self.admit(facts)
        if isinstance(admitted, Refusal):
            self.refuse(admitted)
        return admitted

    def admit(self, facts: CallFacts) -> Call | Refusal:
        """``enter``'s verdict without its blocking part: the allowed call, or the refusal
        that ``refuse`` must audit and raise.

        Authentication and the policy check work on memory only (the certificate, the
        CRL, the delegation token's signature and replay cache, the policy snapshot), so
        the edge runs this on the event loop and needs a worker thread only to audit a
        refusal. Each credential is checked once: a refusal carries what was decided, so
        a delegation token is not offered to the replay cache a second time.
        """
        try:
            principal = self._authn.authenticate(facts.auth_context, facts.metadata, facts.peer)
        except (AuthenticationError, PermissionDeniedError) as e:
            return Refusal(facts, None, e)
        decision = self.policy.current.check(principal, facts.method)
        call = Call(facts, principal, decision)
        return call if decision.allowed else Refusal(facts, call, None)

    def refuse(self, refusal: Refusal) -> NoReturn:
        """Audit ``refusal`` (blocks until its event commits), then raise it."""
        self.audit_refusal(refusal)
        raise refusal.exception()

    def audit_refusal(self, refusal: Refusal) -> None:
        """Audit ``refusal`` and count it for its source's incident window (blocks until
        its event commits); ``refuse`` without the raise, for the edge's ``audit_job``."""
        facts = refusal.facts
        if refusal.error is not None:
            self._unidentified(facts, refusal.error)
            return
        call = refusal.call
        assert call is not None  # one of the two is set (Refusal)
        self.audit(
            call, facts.method, outcome="denied", status="PERMISSION_DENIED",
            reason=call.decision.reason,
        )  # fmt: skip
        self._incidents.denied(source_host(facts.peer))

    def identify(self, facts: CallFacts) -> Principal:
        """Authenticate ``facts`` only; a failure is audited and raised."""
        try:
            return self._authn.authenticate(facts.auth_context, facts.metadata, facts.peer)
        except (AuthenticationError, PermissionDeniedError) as e:
            self._unidentified(facts, e)
            raise

    def _unidentified(
        self, facts: CallFacts, error: AuthenticationError | PermissionDeniedError
    ) -> None:
        """Audit a failed authentication and count it for the source's incident window."""
        # The certificate that presented the bad token is named, so the officer
        # knows which application to ask (its CN is verified by the TLS handshake).
        application = presenting_application(facts)
        unknown = Principal("unauthenticated", application, frozenset(), facts.peer)
        denied = isinstance(error, PermissionDeniedError)
        status = "PERMISSION_DENIED" if denied else "UNAUTHENTICATED"
        self._write(
            unknown, facts.method, facts.method, outcome="denied", status=status,
            reason=str(error),
        )  # fmt: skip
        self._incidents.denied(source_host(facts.peer))

    def in_scope(self, call: Call, patient_index: bytes) -> bool:
        """Whether ``call`` may touch the patient, asked quietly (no event, no incident):
        for choosing what to attempt, never instead of the gate that audits the attempt."""
        if not call.decision.patient_scoped:
            return True
        return self.grants.has_access(call.principal.name, patient_index, _now()) is not None

    def check_scope(self, call: Call, ref: RecordRef) -> str:
        """Raise unless ``call`` may touch ``ref``'s patient; the break-the-glass note if any."""
        if not call.decision.patient_scoped:
            return ""
        grant = self.grants.has_access(call.principal.name, ref.patient_index, _now())
        if grant is None:
            self.audit(
                call,
                record_resource(ref),
                ref.patient_index,
                outcome="denied",
                status="PERMISSION_DENIED",
                reason=NO_GRANT,
            )
            self._incidents.denied(source_host(call.facts.peer))
            raise PermissionDeniedError(NO_GRANT)
        # The grant id, never the clinician's free-text reason: the trail is immutable and
        # exported, and a reason may name the patient. The reason stays with the grant.
        return f"break-the-glass grant {grant.id}" if grant.break_glass else ""

    def patient_gate(self, call: Call) -> Gate:
        """Check patient scope, then commit the allowed event: reads pass this first."""

        def gate(ref: RecordRef) -> None:
            admission = ReadAdmission(self, call)
            admission.gate(ref)
            admission.wait()

        return gate

    def read_admission(self, call: Call) -> ReadAdmission:
        """``patient_gate``'s checks with the allowed event committing in the background:
        the read fetches meanwhile and calls ``ReadAdmission.wait`` before releasing any
        of it (docs/architecture.md, read path step 1: the first byte leaves only once
        the event is committed)."""
        return ReadAdmission(self, call)

    def signing_admission(self, call: Call) -> SigningAdmission:
        """``patient_gate``'s checks with the allowed read event held, to commit in the
        signature's own transaction (``SigningAdmission.commit_change``), or alone before
        the error leaves if the signing fails first (``SigningAdmission.settle``)."""
        return SigningAdmission(self, call)

    def allowed_read(self, call: Call, ref: RecordRef) -> AuditEntry:
        """The allowed event of ``call`` reading ``ref``, once its scope is checked (a
        denial is committed and raised): to commit before anything read is released."""
        reason = self.check_scope(call, ref)
        return _entry(
            call.principal, call.action, record_resource(ref), ref.patient_index,
            outcome="allowed", reason=reason,
        )  # fmt: skip

    def count_read(self, call: Call) -> None:
        """Count an admitted read of a record for the bulk-read incident detector."""
        if call.action in ("records.read", "records.stat"):
            self._incidents.read(call.principal.name)

    def scope_gate(self, call: Call) -> Gate:
        """Check patient scope only (before an upload starts)."""

        def gate(ref: RecordRef) -> None:
            self.check_scope(call, ref)

        return gate

    def replay_gate(self, call: Call) -> Gate:
        """Commit the allowed event of a retried put answered with the first put's version."""

        def gate(ref: RecordRef) -> None:
            self.audit(
                call, record_resource(ref), ref.patient_index, outcome="allowed",
                reason=REPLAY_REASON,
            )  # fmt: skip

        return gate

    def commit_gate(self, call: Call) -> CommitGate:
        """Commit a write's row and its allowed event in one transaction."""
        return lambda ref, insert: self.audit_change(
            call, record_resource(ref), insert, ref.patient_index
        )

    def audit_change(
        self,
        call: Call,
        resource: str,
        change: Change[T],
        patient_index: bytes | None = None,
        *,
        reason: str = "",
        before: Sequence[AuditEntry] = (),
    ) -> T:
        """Run ``change`` and commit its allowed event in the same transaction, or neither.

        The change's own error (a conflict, a missing row) is raised with its event not
        written; ``AuditUnavailableError`` if the event cannot be committed. ``before``:
        events committed in that transaction ahead of it, even if the change raises
        (``AuditTrail.record_change``).
        """
        entry = _entry(
            call.principal, call.action, resource, patient_index, outcome="allowed", reason=reason
        )
        return self.trail.record_change(entry, change, before=before)

    def audit(
        self,
        call: Call,
        resource: str,
        patient_index: bytes | None = None,
        *,
        outcome: Outcome,
        status: str = "",
        reason: str = "",
    ) -> None:
        """Commit one event for ``call``; ``AuditUnavailableError`` if it cannot be."""
        self._write(
            call.principal,
            call.action,
            resource,
            patient_index,
            outcome=outcome,
            status=status,
            reason=reason,
        )

    def audit_as(
        self,
        principal: Principal,
        action: str,
        resource: str,
        *,
        outcome: Outcome,
        status: str = "",
        reason: str = "",
    ) -> None:
        """Commit one event that is not about one entered call (e.g. refused calls)."""
        self._write(principal, action, resource, outcome=outcome, status=status, reason=reason)

    def audit_failure(self, call: Call, resource: str, status: str, reason: str = "") -> None:
        """Best effort: record that an allowed call then failed (the call fails anyway)."""
        try:
            self.audit(call, resource, outcome="failed", status=status, reason=reason)
        except Exception:  # the caller already gets an error; the log keeps this one
            log.exception("could not audit a failed call", extra={"action": call.action})

    def _write(
        self,
        principal: Principal,
        action: str,
        resource: str,
        patient_index: bytes | None = None,
        *,
        outcome: Outcome,
        status: str = "",
        reason: str = "",
    ) -> None:
        self.trail.record(
            _entry(
                principal,
                action,
                resource,
                patient_index,
                outcome=outcome,
                status=status,
                reason=reason,
            )
        )


def _entry(
    principal: Principal,
    action: str,
    resource: str,
    patient_index: bytes | None,
    *,
    outcome: Outcome,
    status: str = "",
    reason: str = "",
) -> AuditEntry:
    return AuditEntry(
        time=_now(),
        principal=principal.name,
        application=principal.application or "",
        role=",".join(sorted(principal.roles)),
        action=action,
        resource=resource,
        outcome=outcome,
        patient_index=patient_index,
        status=status,
        reason=reason,
        source=principal.source,
    )


def _now() -> datetime:
    return datetime.now(UTC)
