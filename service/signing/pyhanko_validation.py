"""pyHanko's checks behind :class:`~service.signing.validation.SignatureValidator`.

This module imports pyHanko: it is imported on first use only, by the validator's
methods (see :mod:`service.signing.asn1_registry`). Each check returns why the signature
is not valid, or ``""`` when it is; the validator turns that into a ``Verdict``.
"""

from __future__ import annotations

import asyncio
import functools
from datetime import datetime

from asn1crypto import cms
from asn1crypto import x509 as asn1_x509
from pyhanko.sign.validation.generic_cms import cms_basic_validation, collect_timing_info
from pyhanko.sign.validation.pdf_embedded import (
    EmbeddedPdfSignature,
    async_validate_pdf_signature,
)
from pyhanko.sign.validation.settings import KeyUsageConstraints
from pyhanko.sign.validation.status import SignatureCoverageLevel, StandardCMSSignatureStatus
from pyhanko_certvalidator import ValidationContext
from pyhanko_certvalidator.errors import InvalidCertificateError

from service.signing.asn1_registry import complete_name_maps
from service.signing.cms import DIGEST_ALGORITHM

complete_name_maps()  # pyHanko has just been imported: service.signing.asn1_registry

_USAGE = KeyUsageConstraints(
    key_usage={"non_repudiation"},
    extd_key_usage={"email_protection", "any_extended_key_usage"},
    explicit_extd_key_usage_required=False,
)

# pyHanko's PDF validator rebuilds its constraints without explicit_extd_key_usage_required
# (so a certificate without an EKU extension would fail there): it checks key usage only,
# and embedded_problem applies _USAGE to the signer's certificate itself, as for CAdES.
_PDF_USAGE = KeyUsageConstraints(key_usage={"non_repudiation"})
_USAGE_FAILED = "certificate chain constraints failed (key usage or CA flags)"


@functools.lru_cache(maxsize=8)
def _roots(anchors: tuple[bytes, ...]) -> tuple[asn1_x509.Certificate, ...]:
    # Parsed here, once per set of anchors: an asn1crypto object keeps the names it
    # resolved, so none parsed before pyHanko loaded is handed to it (asn1_registry).
    return tuple(asn1_x509.Certificate.load(der) for der in anchors)


def detached_problem(
    anchors: tuple[bytes, ...], p7s: bytes, content_sha256: bytes, signing_time: datetime
) -> str:
    """Why the detached ``p7s`` over content whose SHA-256 is given is not valid, or ``""``."""
    try:
        signed_data = _signed_data(p7s)
    except ValueError as e:
        return str(e)
    try:
        status = asyncio.run(_status(signed_data, content_sha256, anchors, signing_time))
    except Exception as e:  # noqa: BLE001  (any malformed input is just "invalid")
        return f"malformed signature ({type(e).__name__})"
    return _problem(status)


def embedded_problem(
    anchors: tuple[bytes, ...], embedded: EmbeddedPdfSignature, signing_time: datetime
) -> str:
    """Why a signature embedded in a PDF (PAdES) is not valid as of ``signing_time``, or ``""``."""
    try:
        status = asyncio.run(
            async_validate_pdf_signature(
                embedded,
                signer_validation_context=_context(anchors, signing_time),
                key_usage_settings=_PDF_USAGE,
            )
        )
    except Exception as e:  # noqa: BLE001  (any malformed input is just "invalid")
        return f"malformed signature ({type(e).__name__})"
    problem = _problem(status)
    if problem:
        return problem
    try:
        _USAGE.validate(status.signing_cert)
    except InvalidCertificateError:
        return _USAGE_FAILED
    if status.coverage != SignatureCoverageLevel.ENTIRE_FILE:
        return "the PDF was changed after it was signed"
    return ""


def _context(anchors: tuple[bytes, ...], signing_time: datetime) -> ValidationContext:
    return ValidationContext(
        trust_roots=_roots(anchors),
        moment=signing_time,
        best_signature_time=signing_time,
        allow_fetching=False,
        revocation_mode="soft-fail",
    )


async def _status(
    signed_data: cms.SignedData,
    content_sha256: bytes,
    anchors: tuple[bytes, ...],
    signing_time: datetime,
) -> StandardCMSSignatureStatus:
    # Mirrors pyHanko 0.38's async_validate_detached_cms, except that the content's
    # digest is computed once by the caller (streamed) for all co-signatures.
    context = _context(anchors, signing_time)
    signer_info = signed_data["signer_infos"][0]
    kwargs = await collect_timing_info(
        signer_info, ts_validation_context=context, raw_digest=lambda _: content_sha256
    )
    kwargs = await cms_basic_validation(
        signed_data,
        raw_digest=content_sha256,
        validation_context=context,
        status_kwargs=kwargs,
        key_usage_settings=_USAGE,
    )
    return StandardCMSSignatureStatus(**kwargs)


def _signed_data(p7s: bytes) -> cms.SignedData:
    """The single-signer, detached, SHA-256 SignedData in ``p7s``, or ``ValueError``."""
    try:
        info = cms.ContentInfo.load(p7s)
        kind = info["content_type"].native
        signed: cms.SignedData = info["content"]
        signers = signed["signer_infos"]
        algorithm = signers[0]["digest_algorithm"]["algorithm"].native if signers else ""
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise ValueError("malformed signature: not a DER CMS SignedData") from e
    if kind != "signed_data":
        raise ValueError("malformed signature: not a CMS SignedData")
    if len(signers) != 1:
        raise ValueError("malformed signature: expected exactly one SignerInfo")
    if algorithm != DIGEST_ALGORITHM:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    return signed


def _problem(status: StandardCMSSignatureStatus) -> str:
    if not status.intact:
        return "content digest mismatch: the record is not the signed content"
    if not status.valid:
        return "signature value does not verify against the certificate"
    if not status.trusted:
        indication = status.trust_problem_indic
        name = getattr(indication, "name", "") or "UNKNOWN"
        return _TRUST_REASONS.get(name, f"certificate not trusted ({name})")
    return ""


_TRUST_REASONS = {
    "NO_CERTIFICATE_CHAIN_FOUND": "untrusted chain: no path to a configured trust anchor",
    "OUT_OF_BOUNDS_NO_POE": "certificate not valid at the signing time (expired or not yet)",
    "OUT_OF_BOUNDS_NOT_REVOKED": "certificate not valid at the signing time (expired or not yet)",
    "EXPIRED": "certificate expired at the signing time",
    "NOT_YET_VALID": "certificate not yet valid at the signing time",
    "CHAIN_CONSTRAINTS_FAILURE": _USAGE_FAILED,
    "REVOKED": "certificate revoked",
    "REVOKED_NO_POE": "certificate revoked",
    "CRYPTO_CONSTRAINTS_FAILURE": "algorithm or key size not allowed at the signing time",
}
