"""SigningService: thin gRPC handlers over ``service.signing.DocumentSigning``.

Every call enters through the access guard in a worker thread. Record access passes
the patient gate (scope check, then the allowed event for ``record/<id>/v<n>`` with the
action ``signatures.sign`` or ``signatures.verify``) before any byte is read. A signer's
key may be used only by its own principal (a person's certificate CN, or the user an
application delegates for); anything else is denied and audited on ``signer/<name>``.
A new signature is audited once more, as ``signature/<id>``: that event commits in the
same transaction as the signature row (``AccessGuard.audit_change``), or neither does.
A CAdES signature's read event is held past the scope check (a denial is committed
at once) and commits in that same transaction, just before ``signature/<id>``
(``AccessGuard.signing_admission``): one audit commit per signature. It commits even
if the row's insert fails, and alone, before the error leaves, if the signing fails
before its commit; nothing is returned before it is committed.
A PAdES signature also writes a new version of the PDF record, audited as a put is
(``record/<id>/v<n>``, committed with the version's row) under ``signatures.sign``.
"""

from __future__ import annotations

import asyncio
from datetime import UTC

from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from service._gen.medvault.v1 import signing_pb2 as pb
from service._gen.medvault.v1 import signing_pb2_grpc as pb_grpc
from service.authz import PermissionDeniedError
from service.calls import CallState, entered, handled
from service.convert import resource_id, version_from_pb
from service.guard import AccessGuard, Call
from service.signing import CommitSignature, DocumentSigning, SignatureFormat, VersionWriter
from service.signing.validation import Verdict
from storage import (
    Change,
    Gate,
    InvalidRecordError,
    RecordRef,
    Signature,
    check_deadline,
    checked_when_run,
)

# The step a call that ended is refused at: nothing is stored in its signer's name.
_STORING = "storing the signature"
_FORMATS: dict[int, SignatureFormat] = {
    pb.SIGNATURE_FORMAT_UNSPECIFIED: SignatureFormat.CADES_DETACHED,
    pb.SIGNATURE_FORMAT_CADES_DETACHED: SignatureFormat.CADES_DETACHED,
    pb.SIGNATURE_FORMAT_PADES: SignatureFormat.PADES,
}
_FORMATS_PB = {
    SignatureFormat.CADES_DETACHED: pb.SIGNATURE_FORMAT_CADES_DETACHED,
    SignatureFormat.PADES: pb.SIGNATURE_FORMAT_PADES,
}


def format_from_pb(value: int) -> SignatureFormat:
    """The requested format (unspecified: CAdES detached); unknown values are refused."""
    try:
        return _FORMATS[value]
    except KeyError:
        raise InvalidRecordError("format", "is not a known signature format") from None


def signature_to_pb(signature: Signature, fmt: SignatureFormat | None = None) -> pb.SignatureInfo:
    """The API view of a stored signature (no ``.p7s`` bytes); its format when known."""
    signing_time = Timestamp()
    signing_time.FromDatetime(signature.signing_time.astimezone(UTC))
    return pb.SignatureInfo(
        id=signature.id,
        record_id=signature.record_id,
        version=signature.version,
        signer=signature.signer,
        certificate_subject=signature.certificate_subject,
        signing_time=signing_time,
        algorithm=signature.algorithm,
        format=_FORMATS_PB[fmt] if fmt else pb.SIGNATURE_FORMAT_UNSPECIFIED,
    )


def _verification(
    signature: Signature, verdict: Verdict, fmt: SignatureFormat
) -> pb.SignatureVerification:
    return pb.SignatureVerification(
        signature=signature_to_pb(signature, fmt), valid=verdict.valid, reason=verdict.reason
    )


class _RememberingGate:
    """The patient gate, keeping the patient index for the second (signature) event."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self.patient_index: bytes | None = None

    def __call__(self, ref: RecordRef) -> None:
        self._gate(ref)
        self.patient_index = ref.patient_index


class SigningServicer(pb_grpc.SigningServiceServicer):  # type: ignore[misc]  # untyped stub
    """medvault.v1.SigningService behind the access guard."""

    def __init__(self, signing: DocumentSigning, guard: AccessGuard) -> None:
        self._signing = signing
        self._guard = guard

    def _check_signer(self, call: Call, signer: str) -> None:
        """Only the signer's own principal may use its key; a denial is audited."""
        if not signer:
            raise InvalidRecordError("signer", "is required")
        if call.principal.name != signer:
            reason = f"signer {signer!r} belongs to another principal"
            self._guard.audit(
                call, f"signer/{signer}", outcome="denied", status="PERMISSION_DENIED",
                reason=reason,
            )  # fmt: skip
            raise PermissionDeniedError(reason)

    def _sign(self, state: CallState, request: pb.SignRecordRequest) -> Signature:
        call = entered(state)
        self._check_signer(call, request.signer)
        version = version_from_pb(request.version, "version")
        if format_from_pb(request.format) is SignatureFormat.PADES:
            # PAdES stores a new version of the document before its signature: the read
            # event commits before anything is read, as patient_gate does.
            gate = _RememberingGate(self._guard.patient_gate(call))
            writer = VersionWriter(
                call.principal.name, self._guard.scope_gate(call), self._guard.commit_gate(call)
            )
            return self._signing.sign_pades(
                request.record_id, version, request.signer, gate, writer=writer,
                commit=self._committer(call, state, gate),
            )  # fmt: skip
        return self._sign_cades(call, state, request.record_id, version, request.signer)

    def _sign_cades(
        self, call: Call, state: CallState, record_id: str, version: int | None, signer: str
    ) -> Signature:
        """Sign with the read event held: it commits with the signature's event and row,
        in one audit transaction; or alone, before the error leaves, if signing fails."""
        admission = self._guard.signing_admission(call)
        gate = _RememberingGate(admission.gate)

        def commit(signature_id: str, insert: Change[Signature]) -> Signature:
            # A call that ended (its deadline, its client cancelling) was told it failed,
            # so no signature may then be stored in its signer's name: checked before the
            # commit is queued, and again in its transaction (the writer may take it up
            # after the call's end); the read event still commits then.
            check_deadline(_STORING)
            state.resource = f"signature/{signature_id}"
            stored = checked_when_run(insert, _STORING)
            return admission.commit_change(state.resource, stored, gate.patient_index)

        try:
            return self._signing.sign(record_id, version, signer, gate, commit)
        finally:
            admission.settle()  # also after an error: the read event precedes its failure

    def _committer(self, call: Call, state: CallState, gate: _RememberingGate) -> CommitSignature:
        """Store a signature with its event in one transaction."""

        def commit(signature_id: str, insert: Change[Signature]) -> Signature:
            state.resource = f"signature/{signature_id}"
            return self._guard.audit_change(call, state.resource, insert, gate.patient_index)

        return commit

    def _verify(
        self, state: CallState, request: pb.VerifyRecordRequest
    ) -> list[tuple[Signature, Verdict, SignatureFormat]]:
        call = entered(state)
        gate = self._guard.patient_gate(call)
        version = version_from_pb(request.version, "version")
        return self._signing.verify(request.record_id, version, gate)

    def _get(self, state: CallState, request: pb.GetSignatureRequest) -> Signature:
        call = entered(state)
        return self._signing.get(request.signature_id, self._guard.patient_gate(call))

    async def SignRecord(  # noqa: N802  (gRPC method names)
        self, request: pb.SignRecordRequest, context: aio.ServicerContext
    ) -> pb.SignatureInfo:
        """Sign one record version with the caller's own signer."""
        async with handled(self._guard, context, "SignRecord") as state:
            state.resource = f"record/{resource_id(request.record_id)}"
            signature = await asyncio.to_thread(self._sign, state, request)
            return signature_to_pb(signature, format_from_pb(request.format))
        raise AssertionError("unreachable")  # pragma: no cover  (abort raised)

    async def VerifyRecord(  # noqa: N802
        self, request: pb.VerifyRecordRequest, context: aio.ServicerContext
    ) -> pb.VerifyRecordResponse:
        """One verdict per stored signature of the version."""
        async with handled(self._guard, context, "VerifyRecord") as state:
            state.resource = f"record/{resource_id(request.record_id)}"
            results = await asyncio.to_thread(self._verify, state, request)
            return pb.VerifyRecordResponse(results=[_verification(*r) for r in results])
        raise AssertionError("unreachable")  # pragma: no cover

    async def GetSignature(  # noqa: N802
        self, request: pb.GetSignatureRequest, context: aio.ServicerContext
    ) -> pb.GetSignatureResponse:
        """The stored ``.p7s`` of one signature."""
        async with handled(self._guard, context, "GetSignature") as state:
            state.resource = f"signature/{resource_id(request.signature_id)}"
            signature = await asyncio.to_thread(self._get, state, request)
            return pb.GetSignatureResponse(signature=signature_to_pb(signature), p7s=signature.p7s)
        raise AssertionError("unreachable")  # pragma: no cover
