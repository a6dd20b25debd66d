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

The checks themselves are in :mod:`service.signing.pyhanko_validation`, imported by the
first validation: building a validator (at start-up) costs no pyHanko import.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from asn1crypto import pem
from asn1crypto import x509 as asn1_x509

if TYPE_CHECKING:
    from pyhanko.sign.validation.pdf_embedded import EmbeddedPdfSignature

_NO_ANCHORS = "no trust anchors configured ([signing] trust_anchors)"


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


def _verdict(problem: str) -> Verdict:
    return Verdict(False, problem) if problem else Verdict(True)


class SignatureValidator:
    """Validates ``.p7s`` files against a fixed set of trust anchors (CA certificates)."""

    def __init__(self, trust_anchors: Iterable[bytes]) -> None:
        # Kept as DER (asn1crypto.load refuses a malformed one now): pyHanko gets
        # objects parsed after it loaded (service.signing.asn1_registry).
        self._anchors = tuple(
            bytes(asn1_x509.Certificate.load(der).dump()) for der in trust_anchors
        )

    def validate(self, p7s: bytes, content_sha256: bytes, signing_time: datetime) -> Verdict:
        """Validate one detached signature over content whose SHA-256 is given.

        Blocking-free but CPU-bound; safe to call from a worker thread.
        """
        if not self._anchors:
            return Verdict(False, _NO_ANCHORS)
        from service.signing import pyhanko_validation  # noqa: PLC0415  (pyHanko, first use)

        return _verdict(
            pyhanko_validation.detached_problem(self._anchors, p7s, content_sha256, signing_time)
        )

    def validate_pdf(self, embedded: EmbeddedPdfSignature, signing_time: datetime) -> Verdict:
        """Validate one signature embedded in a PDF (PAdES), as of ``signing_time``."""
        if not self._anchors:
            return Verdict(False, _NO_ANCHORS)
        from service.signing import pyhanko_validation  # noqa: PLC0415  (pyHanko, first use)

        return _verdict(pyhanko_validation.embedded_problem(self._anchors, embedded, signing_time))
