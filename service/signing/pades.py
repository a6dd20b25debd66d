"""PAdES-B-B signatures embedded in PDFs: made by pyHanko's PDF signer, signed in the token.

pyHanko adds an approval signature field and a signature dictionary to the PDF as an
incremental update (the original bytes stay a prefix of the result, so earlier
signatures stay intact), with ``/SubFilter /ETSI.CAdES.detached``. The CMS inside is
built by the same :class:`~service.signing.cms.TokenCmsSigner` as the detached
``.p7s``: only the raw signature over the DER signed attributes comes from the token.

Level **B-B** (ETSI EN 319 142-1): signed attributes content-type, message-digest (of
the PDF's signed byte range) and signing-certificate-v2; the signing time is the
signature dictionary's ``/M`` (not a signed attribute, as PAdES requires). There is no
trusted timestamp (that would be B-T) and no validation data in the document (B-LT),
so the signing time is the server's claim, as for the CAdES signatures.

pyHanko needs the whole file in memory and seekable, so PDFs are signed up to
:data:`~service.signing.pdf_bounds.MAX_PADES_BYTES`; a larger record is refused before
any of it is read.

This module imports pyHanko: it is imported on first use only, by the functions of
:mod:`service.signing` that sign or verify (see :mod:`service.signing.asn1_registry`).
"""

from __future__ import annotations

import asyncio
import io
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from asn1crypto import cms
from asn1crypto import x509 as asn1_x509
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.fields import SigSeedSubFilter
from pyhanko.sign.signers.pdf_signer import PdfSignatureMetadata, PdfSigner
from pyhanko.sign.validation.pdf_embedded import EmbeddedPdfSignature

from keystore import KeystoreError
from keystore import Signer as KeySigner
from service.signing.asn1_registry import complete_name_maps
from service.signing.cms import DIGEST_ALGORITHM, TokenCmsSigner
from storage import InvalidRecordError

complete_name_maps()  # pyHanko has just been imported: service.signing.asn1_registry

FIELD_PREFIX = "medvault-signature-"
# A PDF any writer can store (the put does not parse a PDF's objects) makes pyHanko
# raise far more than PdfError: its own assertions, AttributeError and OverflowError on
# objects of the wrong type or size, RecursionError on nesting thousands deep (all
# found by fuzzing). Reading treats any of them as "no embedded signature"; signing as
# a PDF that cannot be signed. Token errors are never the PDF's fault: they pass.
_PASS = (KeystoreError,)


@dataclass(frozen=True, slots=True)
class SignedPdf:
    """A PDF with one more embedded signature: its bytes, that signature's CMS, its /M."""

    pdf: bytes
    cms: bytes
    signing_time: datetime


def cms_of(embedded: EmbeddedPdfSignature) -> bytes:
    """The DER CMS ContentInfo of an embedded signature, without its zero padding."""
    contents = bytes(embedded.sig_object["/Contents"])
    return bytes(cms.ContentInfo.load(contents).dump())


def embedded_signatures(pdf: bytes) -> list[EmbeddedPdfSignature]:
    """Every signature embedded in ``pdf`` (``[]`` if it does not parse as a PDF)."""
    try:
        return list(PdfFileReader(io.BytesIO(pdf), strict=False).embedded_signatures)
    except Exception:  # noqa: BLE001  (any failure to read a hostile PDF: see _PASS)
        return []


def embedded_by_cms(pdf: bytes) -> dict[bytes, EmbeddedPdfSignature]:
    """The signatures embedded in ``pdf``, by their CMS (unparsable ones left out)."""
    found = {}
    for embedded in embedded_signatures(pdf):
        try:
            found[cms_of(embedded)] = embedded
        except Exception:  # noqa: BLE001, S112  (an unreadable signature object: skipped)
            continue
    return found


def _unsignable() -> InvalidRecordError:
    return InvalidRecordError(
        "record_id", "is a PDF that cannot be signed with PADES (damaged structure, "
        "or certified against further changes); sign it as CADES_DETACHED",
    )  # fmt: skip


def sign_pdf(
    key_signer: KeySigner,
    certificate_der: bytes,
    pdf: bytes,
    chain: Sequence[bytes] = (),
) -> SignedPdf:
    """``pdf`` with a new PAdES-B-B approval signature made in the token.

    Blocking (the token signs); call it from a worker thread. ``InvalidRecordError``
    (naming no content) when pyHanko cannot sign the file: encrypted, damaged, or
    certified against further changes.
    """
    certificate = asn1_x509.Certificate.load(certificate_der)
    signer = TokenCmsSigner(key_signer, certificate, [asn1_x509.Certificate.load(c) for c in chain])
    field = FIELD_PREFIX + secrets.token_hex(8)
    meta = PdfSignatureMetadata(
        field_name=field, md_algorithm=DIGEST_ALGORITHM, subfilter=SigSeedSubFilter.PADES
    )
    try:
        writer = IncrementalPdfFileWriter(io.BytesIO(pdf), strict=False)
        encrypted = writer.prev.encrypted
    except Exception as e:  # pyHanko on a hostile PDF: see _PASS
        raise _unsignable() from e
    if encrypted:
        raise InvalidRecordError("record_id", "is an encrypted PDF; PADES cannot sign it")
    try:
        out = asyncio.run(PdfSigner(meta, signer).async_sign_pdf(writer, output=io.BytesIO()))
    except _PASS:
        raise
    except Exception as e:  # pyHanko on a hostile PDF: see _PASS
        raise _unsignable() from e
    signed = out.getvalue()
    ours = [s for s in embedded_signatures(signed) if s.field_name == field]
    if len(ours) != 1 or ours[0].self_reported_timestamp is None:
        raise _unsignable()  # the result does not read back: the structure is damaged
    when = ours[0].self_reported_timestamp.astimezone(UTC)
    return SignedPdf(signed, cms_of(ours[0]), when)
