"""Validation of detached CMS signatures with pyHanko and its certificate validator.

Checks, for each ``.p7s``: the message digest against the record's bytes, the
signature value, the signing-certificate-v2 binding, a path from the signer's
certificate to one of the configured trust anchors, validity of every certificate on
that path at the signing time, and the signer's key usage (nonRepudiation, i.e.
contentCommitment; an extended key usage, when present, must allow emailProtection).

The signing time is the one the server recorded when it signed (it equals the
signed ``signing-time`` attribute); without a trusted timestamp that is the best
evidence of when the signature was made. No network fetching: revocation is checked
only from what the configuration provides (none by default, "soft-fail").

A PAdES signature embedded in a PDF (``service.signing.pades``) is checked the same way
by pyHanko's PDF validator, which hashes the signature's byte range itself, and must
cover the whole file: the stored version is the one that was signed last.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from asn1crypto import cms, pem
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

from service.signing.cms import DIGEST_ALGORITHM

_USAGE = KeyUsageConstraints(
    key_usage={"non_repudiation"},
    extd_key_usage={"email_protection", "any_extended_key_usage"},
    explicit_extd_key_usage_required=False,
)

# pyHanko's PDF validator rebuilds its constraints without explicit_extd_key_usage_required
# (so a certificate without an EKU extension would fail there): it checks key usage only,
# and validate_pdf applies _USAGE to the signer's certificate itself, as for CAdES.
_PDF_USAGE = KeyUsageConstraints(key_usage={"non_repudiation"})
_USAGE_FAILED = "certificate chain constraints failed (key usage or CA flags)"


def load_pem_certificates(path: str) -> list[bytes]:
    """DER certificates from a PEM bundle file; ``[]`` for an empty path.

    ``ConfigError``-free on purpose (this layer knows no config): a missing or bad file
    raises ``ValueError`` naming the path, which start-up reports.
    """
    if not path:
        return []
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read certificate file {path}: {e.strerror}") from e
    found = [der for _, _, der in pem.unarmor(data, multiple=True)] if pem.detect(data) else []
    if not found:
        raise ValueError(f"{path} holds no PEM certificate")
    return [bytes(asn1_x509.Certificate.load(der).dump()) for der in found]


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome for one signature: valid, or the reason it is not."""

    valid: bool
    reason: str = ""


class SignatureValidator:
    """Validates ``.p7s`` files against a fixed set of trust anchors (CA certificates)."""

    def __init__(self, trust_anchors: Iterable[bytes]) -> None:
        self._anchors = [asn1_x509.Certificate.load(der) for der in trust_anchors]

    def validate(self, p7s: bytes, content_sha256: bytes, signing_time: datetime) -> Verdict:
        """Validate one detached signature over content whose SHA-256 is given.

        Blocking-free but CPU-bound; safe to call from a worker thread.
        """
        if not self._anchors:
            return Verdict(False, "no trust anchors configured ([signing] trust_anchors)")
        try:
            signed_data = _signed_data(p7s)
        except ValueError as e:
            return Verdict(False, str(e))
        try:
            status = asyncio.run(self._status(signed_data, content_sha256, signing_time))
        except Exception as e:  # noqa: BLE001  (any malformed input is just "invalid")
            return Verdict(False, f"malformed signature ({type(e).__name__})")
        return _verdict(status)

    def validate_pdf(self, embedded: EmbeddedPdfSignature, signing_time: datetime) -> Verdict:
        """Validate one signature embedded in a PDF (PAdES), as of ``signing_time``."""
        if not self._anchors:
            return Verdict(False, "no trust anchors configured ([signing] trust_anchors)")
        try:
            status = asyncio.run(
                async_validate_pdf_signature(
                    embedded,
                    signer_validation_context=self._context(signing_time),
                    key_usage_settings=_PDF_USAGE,
                )
            )
        except Exception as e:  # noqa: BLE001  (any malformed input is just "invalid")
            return Verdict(False, f"malformed signature ({type(e).__name__})")
        verdict = _verdict(status)
        if not verdict.valid:
            return verdict
        try:
            _USAGE.validate(status.signing_cert)
        except InvalidCertificateError:
            return Verdict(False, _USAGE_FAILED)
        if status.coverage != SignatureCoverageLevel.ENTIRE_FILE:
            return Verdict(False, "the PDF was changed after it was signed")
        return verdict

    def _context(self, signing_time: datetime) -> ValidationContext:
        return ValidationContext(
            trust_roots=self._anchors,
            moment=signing_time,
            best_signature_time=signing_time,
            allow_fetching=False,
            revocation_mode="soft-fail",
        )

    async def _status(
        self, signed_data: cms.SignedData, content_sha256: bytes, signing_time: datetime
    ) -> StandardCMSSignatureStatus:
        # Mirrors pyHanko 0.38's async_validate_detached_cms, except that the content's
        # digest is computed once by the caller (streamed) for all co-signatures.
        context = self._context(signing_time)
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


def _verdict(status: StandardCMSSignatureStatus) -> Verdict:
    if not status.intact:
        return Verdict(False, "content digest mismatch: the record is not the signed content")
    if not status.valid:
        return Verdict(False, "signature value does not verify against the certificate")
    if not status.trusted:
        indication = status.trust_problem_indic
        name = getattr(indication, "name", "") or "UNKNOWN"
        return Verdict(False, _TRUST_REASONS.get(name, f"certificate not trusted ({name})"))
    return Verdict(True)


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
