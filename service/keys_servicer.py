"""KeyService: master keys (rotation, listing, rewrap, retirement) and document signers
(list, create with a CSR, import a certificate), each audited.

Every call needs ``keys.manage`` (the ``key_admin`` role). The audit resource is the
version concerned, ``kek/v<N>``, or the signer, ``signer/<name>``; a rewrap writes one
event when it starts and one when it ends (finished, stopped by the client, or failed),
not one per batch: a large store has tens of thousands of batches and the end event
carries the counts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from cryptography import x509
from grpc import aio

from keystore import (
    CertificateMismatchError,
    Pkcs11SessionPool,
    SignerSummary,
    SigningKeyKind,
    create_signer_key,
    import_certificate,
    list_signers,
    make_csr,
    signer_label,
)
from service._gen.medvault.v1 import keys_pb2 as kpb
from service._gen.medvault.v1 import keys_pb2_grpc as kpb_grpc
from service.calls import CallState, entered, handled
from service.convert import version_from_pb
from service.convert_audit import timestamp
from service.guard import AccessGuard, Call
from storage import (
    DEFAULT_BATCH,
    IntegrityError,
    InvalidRecordError,
    KekManager,
    KekVersionInfo,
    Outcome,
    RewrapJob,
)

log = logging.getLogger(__name__)


def _resource(version: int) -> str:
    return f"kek/v{version}"


def kek_to_pb(info: KekVersionInfo) -> kpb.KekVersion:
    """The proto of one KEK version."""
    return kpb.KekVersion(
        version=info.version,
        state=info.state,
        wrapped_keys=info.wrapped_keys,
        created_at=timestamp(info.created_at),
    )


def signer_to_pb(s: SignerSummary) -> kpb.Signer:
    """The proto of one signer (no private material exists to put in it)."""
    return kpb.Signer(
        name=s.name, key_type=s.key_type, certificate_subject=s.subject,
        not_after=timestamp(s.not_after) if s.not_after is not None else None,
    )  # fmt: skip


def _signer_name(name: str) -> None:
    try:
        signer_label(name)
    except ValueError as e:
        raise InvalidRecordError(
            "name", "must be 1-100 letters, digits, '.', '_', '@' or '-'"
        ) from e


class KeyServicer(kpb_grpc.KeyServiceServicer):  # type: ignore[misc]  # untyped stub
    """medvault.v1.KeyService."""

    def __init__(self, kek: KekManager, guard: AccessGuard, pool: Pkcs11SessionPool) -> None:
        self._kek = kek
        self._guard = guard
        self._pool = pool

    def _list_signers(self, state: CallState) -> list[SignerSummary]:
        call = entered(state)
        state.resource = "signer"
        self._guard.audit(call, "signer", outcome="allowed", reason="list signers")
        return list_signers(self._pool)

    def _create_signer(
        self, state: CallState, request: kpb.CreateSignerRequest
    ) -> tuple[bool, bytes]:
        call = entered(state)
        _signer_name(request.name)
        subject = request.subject or f"CN={request.name}"
        try:
            x509.Name.from_rfc4514_string(subject)
        except ValueError as e:
            raise InvalidRecordError("subject", "is not an RFC 4514 name") from e
        state.resource = f"signer/{request.name}"
        kind: SigningKeyKind = "rsa-2048" if request.rsa else "ec-p256"
        # The event commits before the key is created: no event, no new key.
        self._guard.audit(call, state.resource, outcome="allowed",
                          reason=f"create signer key ({kind}) and CSR")  # fmt: skip
        created = create_signer_key(self._pool, request.name, kind)
        return created, make_csr(self._pool, request.name, subject)

    def _import_certificate(
        self, state: CallState, request: kpb.ImportCertificateRequest
    ) -> SignerSummary:
        call = entered(state)
        _signer_name(request.name)
        state.resource = f"signer/{request.name}"
        self._guard.audit(call, state.resource, outcome="allowed", reason="import certificate")
        try:
            cert = import_certificate(self._pool, request.name, request.certificate)
        except CertificateMismatchError as e:
            raise InvalidRecordError("certificate", str(e)) from e
        return SignerSummary(
            request.name, "", cert.subject.rfc4514_string(), cert.not_valid_after_utc
        )

    def _rotate(self, state: CallState) -> KekVersionInfo:
        call = entered(state)
        state.resource = "kek"
        # The claim of the version number commits with this event, before the key is
        # created on the token: no event, no new key.
        return self._kek.rotate(
            lambda version, claim: self._guard.audit_change(
                call, _resource(version), claim, reason="rotate: new version"
            )
        )

    def _list(self, state: CallState) -> list[KekVersionInfo]:
        call = entered(state)
        self._guard.audit(call, "kek", outcome="allowed", reason="list versions")
        return self._kek.list()

    def _retire(self, state: CallState, request: kpb.RetireKekRequest) -> KekVersionInfo:
        call = entered(state)
        version_from_pb(request.version, "version")  # an SQL INTEGER: refuse what cannot be one
        state.resource = _resource(request.version)
        destroy = request.destroy_key
        # The retirement commits with its event, before the irreversible step: no
        # event, no retirement, no deletion. A failed deletion is audited as a failure.
        reason = "retired; destroying the key on the token" if destroy else "retired; key kept"
        return self._kek.retire(
            request.version,
            destroy_key=destroy,
            commit=lambda mark: self._guard.audit_change(
                call, _resource(request.version), mark, reason=reason
            ),
        )

    def _start_rewrap(self, state: CallState, request: kpb.RewrapRequest) -> RewrapJob:
        call = entered(state)
        version_from_pb(request.from_version, "from_version")
        job = self._kek.rewrap(request.from_version, request.batch_size or DEFAULT_BATCH)
        state.resource = _resource(job.target)
        scope = f"from v{request.from_version}" if request.from_version else "all older"
        self._guard.audit(
            call, state.resource, outcome="allowed",
            reason=f"rewrap started ({scope}): {job.remaining} keys to move",
        )  # fmt: skip
        return job

    def _end_rewrap(self, call: Call, job: RewrapJob, how: str) -> None:
        """The closing event: how the job ended and its counts (best effort if stopped)."""
        p = job.progress()
        reason = (
            f"rewrap {how}: {p.rewrapped} rewrapped, {p.remaining} remaining, "
            f"{p.failed} failed to authenticate, {p.resealed} legacy records resealed"
        )
        outcome: Outcome = "allowed" if how == "finished" and not p.failed else "failed"
        try:
            self._guard.audit(call, _resource(job.target), outcome=outcome, reason=reason)
        except Exception:
            if how == "finished":
                raise
            log.exception("could not audit the end of a rewrap")

    async def RotateKek(  # noqa: N802  (gRPC method names)
        self, request: kpb.RotateKekRequest, context: aio.ServicerContext
    ) -> kpb.RotateKekResponse:
        """Create KEK v(N+1); new writes use it at once."""
        async with handled(self._guard, context, "RotateKek") as state:
            created = await asyncio.to_thread(self._rotate, state)
            return kpb.RotateKekResponse(created=kek_to_pb(created))
        raise AssertionError("unreachable")  # pragma: no cover

    async def ListKeks(  # noqa: N802
        self, request: kpb.ListKeksRequest, context: aio.ServicerContext
    ) -> kpb.ListKeksResponse:
        """Every version with its state and the number of keys it wraps."""
        async with handled(self._guard, context, "ListKeks") as state:
            versions = await asyncio.to_thread(self._list, state)
            return kpb.ListKeksResponse(versions=[kek_to_pb(v) for v in versions])
        raise AssertionError("unreachable")  # pragma: no cover

    async def RetireKek(  # noqa: N802
        self, request: kpb.RetireKekRequest, context: aio.ServicerContext
    ) -> kpb.KekVersion:
        """Retire a version once nothing uses it; destroy its key only if asked to."""
        async with handled(self._guard, context, "RetireKek") as state:
            retired = await asyncio.to_thread(self._retire, state, request)
            return kek_to_pb(retired)
        raise AssertionError("unreachable")  # pragma: no cover

    async def ListSigners(  # noqa: N802
        self, request: kpb.ListSignersRequest, context: aio.ServicerContext
    ) -> kpb.ListSignersResponse:
        """Signer keys on the token and their certificates' subject and expiry."""
        async with handled(self._guard, context, "ListSigners") as state:
            signers = await asyncio.to_thread(self._list_signers, state)
            return kpb.ListSignersResponse(signers=[signer_to_pb(s) for s in signers])
        raise AssertionError("unreachable")  # pragma: no cover

    async def CreateSigner(  # noqa: N802
        self, request: kpb.CreateSignerRequest, context: aio.ServicerContext
    ) -> kpb.CreateSignerResponse:
        """Create a signer key on the token (kept if it exists) and return its CSR."""
        async with handled(self._guard, context, "CreateSigner") as state:
            created, csr = await asyncio.to_thread(self._create_signer, state, request)
            return kpb.CreateSignerResponse(created=created, csr_pem=csr)
        raise AssertionError("unreachable")  # pragma: no cover

    async def ImportCertificate(  # noqa: N802
        self, request: kpb.ImportCertificateRequest, context: aio.ServicerContext
    ) -> kpb.Signer:
        """Store a CA-signed certificate beside its signer's key."""
        async with handled(self._guard, context, "ImportCertificate") as state:
            summary = await asyncio.to_thread(self._import_certificate, state, request)
            return signer_to_pb(summary)
        raise AssertionError("unreachable")  # pragma: no cover

    async def Rewrap(  # noqa: N802
        self, request: kpb.RewrapRequest, context: aio.ServicerContext
    ) -> AsyncIterator[kpb.RewrapProgress]:
        """Move wrapped keys to the active version, one batch per progress message."""
        async with handled(self._guard, context, "Rewrap") as state:
            job = await asyncio.to_thread(self._start_rewrap, state, request)
            assert state.call is not None  # set by _start_rewrap
            async for message in self._run(state.call, job):
                yield message

    async def _run(self, call: Call, job: RewrapJob) -> AsyncIterator[kpb.RewrapProgress]:
        how = "stopped"
        try:
            yield _progress_pb(job)
            while not job.done:
                await asyncio.to_thread(job.step)
                yield _progress_pb(job)
            how = "finished"
        except Exception:
            how = "failed"
            raise
        finally:
            await asyncio.shield(asyncio.to_thread(self._end_rewrap, call, job, how))
        if job.failed_ids:
            raise IntegrityError(
                f"{len(job.failed_ids)} wrapped keys failed to authenticate and were left "
                "on their old version; their records are unreadable (see the audit trail)"
            )


def _progress_pb(job: RewrapJob) -> kpb.RewrapProgress:
    p = job.progress()
    return kpb.RewrapProgress(
        rewrapped=p.rewrapped, remaining=p.remaining, target_version=p.target_version
    )
