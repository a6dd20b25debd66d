"""Document signatures: the use cases behind ``SigningService`` (sign, verify, get).

A record version is opened through ``storage.signatures`` (so patient scope and the
audit event come first). To sign, its authenticated SHA-256 (sealed in the verified
row at put time, ``storage.row_auth``; see docs/signatures.md) is signed in the token
as a detached CAdES-BES ``.p7s`` (``service.signing.cms``) without reading the content
again; to verify, its plaintext is hashed while it streams (never held whole) and
checked against every stored signature (``service.signing.validation``). Signer keys
and certificates live on the token (``keystore.certificates``).

A PDF record may instead be signed with PAdES (``service.signing.pades``): the signed
PDF, with the signature embedded, is stored as a new version of the record, and the
signature's row is attached to that version (its CMS is the ``.p7s`` then). Verifying
recognises such a row by finding its CMS embedded in the version's PDF.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from cryptography import x509

import service.signing.asn1_registry  # noqa: F401  (asn1crypto's registrations, at start)
from keystore import Signer as KeySigner
from keystore import SignerFactory, SignerUnusableError
from service.limits import PdfSlots
from service.signing.pdf_bounds import MAX_PADES_BYTES, check_size, read_bounded
from service.signing.validation import SignatureValidator, Verdict
from storage import (
    Change,
    CommitGate,
    Gate,
    IntegrityError,
    InvalidRecordError,
    NewRecord,
    NewSignature,
    RecordConflictError,
    RecordKind,
    RecordSignatures,
    Signature,
    SignedRecord,
)

if TYPE_CHECKING:  # these modules import pyHanko: the methods below load them on first use
    from pyhanko.sign.validation.pdf_embedded import EmbeddedPdfSignature

    from service.signing.cms import CadesSigner
    from service.signing.pades import SignedPdf

# pyHanko's reader logs what it trips over quoting the PDF (a repeated dictionary key
# by its name, a bad stream's error): that is patient content, and the root logger
# writes the service's log. As for pydicom and hl7 (storage.formats), its records stop
# here, before pyHanko loads; a refusal says what was wrong without them.
# pyhanko_certvalidator (certificates, not content) still logs.
_PYHANKO_LOG = logging.getLogger("pyhanko")
_PYHANKO_LOG.propagate = False
_PYHANKO_LOG.addHandler(logging.NullHandler())

# How long a signer's key handle and certificate are reused before the token is asked
# again (an operator may import a renewed certificate while the service runs).
SIGNER_CACHE_SECONDS = 60.0

# Stores a prepared signature (its id, the change inserting it) with its audit event.
CommitSignature = Callable[[str, Change[Signature]], Signature]
# PDFs held whole in memory at once over all callers (service.limits.PdfSlots): each
# costs up to about three times MAX_PADES_BYTES while pyHanko signs or reads it.
MAX_PDFS_AT_ONCE = 4
# Pieces of a signed PDF as it is stored (the record store encrypts it segment by segment).
PIECE_SIZE = 1 << 20


class SignatureFormat(enum.Enum):
    """How a signature is made and kept."""

    CADES_DETACHED = "cades-detached"  # a .p7s beside the unchanged version
    PADES = "pades"  # embedded in a new version of a PDF record


@dataclass(frozen=True, slots=True)
class VersionWriter:
    """How a PAdES-signed PDF is written for the caller: as a put would be."""

    creator: str
    admit: Gate
    on_commit: CommitGate


@dataclass(frozen=True, slots=True)
class SignerIdentity:
    """A token signer ready to sign: its key, its certificate (DER) and that parsed,
    and what depends on them alone (built once per load, not per signature)."""

    name: str
    key: KeySigner
    certificate_der: bytes
    certificate: x509.Certificate
    loaded_at: float
    cades: CadesSigner
    subject: str
    algorithm: str

    @classmethod
    def load(cls, name: str, key: KeySigner, der: bytes, chain: Sequence[bytes]) -> SignerIdentity:
        """The identity of ``name`` with its CAdES template built."""
        from service.signing.cms import CadesSigner, algorithm_name  # noqa: PLC0415  (pyHanko)

        certificate = x509.load_der_x509_certificate(der)
        return cls(
            name, key, der, certificate, time.monotonic(), CadesSigner(key, der, chain),
            certificate.subject.rfc4514_string(), algorithm_name(der),
        )  # fmt: skip


def _pieces(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), PIECE_SIZE):
        yield bytes(view[start : start + PIECE_SIZE])


def content_digest(chunks: Iterable[bytes]) -> bytes:
    """SHA-256 of a stream, consumed chunk by chunk."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.digest()


class DocumentSigning:
    """Sign record versions with token signers and verify their stored signatures."""

    def __init__(
        self,
        signatures: RecordSignatures,
        signers: SignerFactory,
        validator: SignatureValidator,
        chain: Sequence[bytes] = (),
        *,
        pdf_slots: int = MAX_PDFS_AT_ONCE,
    ) -> None:
        self._pdfs = PdfSlots(pdf_slots)
        self._signatures = signatures
        self._signers = signers
        self._validator = validator
        self._chain = tuple(chain)
        self._cache: dict[str, SignerIdentity] = {}
        self._lock = threading.Lock()

    def identity(self, name: str) -> SignerIdentity:
        """The signer ``name`` with its certificate, checked valid now."""
        with self._lock:
            cached = self._cache.get(name)
        if cached is None or time.monotonic() - cached.loaded_at > SIGNER_CACHE_SECONDS:
            # The key first: a missing key's error names create-signer.
            key = self._signers.document_signer(name)
            der = self._signers.document_certificate(name)
            cached = SignerIdentity.load(name, key, der, self._chain)
            with self._lock:
                self._cache[name] = cached
        now = datetime.now(UTC)
        cert = cached.certificate
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise SignerUnusableError(
                f"the certificate of signer {name!r} is valid only from "
                f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}; "
                f"import a current one with `medvault keys import-cert {name} CERT.pem`"
            )
        return cached

    def sign(
        self, record_id: str, version: int | None, name: str, admit: Gate, commit: CommitSignature
    ) -> Signature:
        """Sign one record version (the latest when ``version`` is None) as ``name``.

        ``commit`` stores the signature with its audit event in one transaction (it gets
        the new signature's id and the change that inserts the row), so a signature
        exists exactly when its event does.
        """
        identity = self.identity(name)  # before any read: an unusable signer reads nothing
        # The content is not read again: the verified row's SHA-256 was sealed under the
        # record's token-wrapped key by the put that hashed and encrypted this content,
        # bound to this record id and version (docs/signatures.md, "Why the stored digest
        # may be signed without reading the content").
        signed = self._signatures.open(record_id, version, admit=admit, content=False)
        signing_time = datetime.now(UTC).replace(microsecond=0)
        p7s = identity.cades.sign(signed.info.sha256, signing_time)
        new = NewSignature(
            signer=name,
            certificate_subject=identity.subject,
            algorithm=identity.algorithm,
            signing_time=signing_time,
            p7s=p7s,
        )
        signature_id, insert = signed.prepare(new)
        return commit(signature_id, insert)

    def sign_pades(
        self,
        record_id: str,
        version: int | None,
        name: str,
        admit: Gate,
        *,
        writer: VersionWriter,
        commit: CommitSignature,
    ) -> Signature:
        """Embed a PAdES-B-B signature by ``name`` in a PDF record's latest version,
        store the result as the next version, and attach the signature to it.

        The new version commits with its write event (``writer``), then the signature
        row with its own event (``commit``). Should the second fail, the new version
        still carries its embedded signature, but ``VerifyRecord`` lists none.
        """
        identity = self.identity(name)
        signed = self._signatures.open(record_id, version, admit=admit)
        info = signed.info
        if info.kind is not RecordKind.PDF:
            raise InvalidRecordError(
                "format", f"PADES signs PDF records only; this record is {info.kind.value}"
            )
        check_size(info.size)  # before reading a byte
        latest = self._signatures.latest_version(info.id)
        if info.version != latest:
            raise RecordConflictError(
                f"version: PADES signs the latest version only ({latest}), as it adds one; "
                f"sign version {info.version} as CADES_DETACHED"
            )
        header = NewRecord(
            patient=info.patient, kind=RecordKind.PDF, content_type=info.content_type,
            title=info.title, supersedes=info.id, supersedes_version=info.version,
        )  # fmt: skip
        with self._pdfs.slot():  # until the signed copy is stored
            result = self._signed_pdf(signed, identity)
            added = self._signatures.add_version(
                header, _pieces(result.pdf), writer.creator,
                admit=writer.admit, on_commit=writer.on_commit,
            )  # fmt: skip
        new = NewSignature(
            signer=name,
            certificate_subject=identity.subject,
            algorithm=identity.algorithm,
            signing_time=result.signing_time,
            p7s=result.cms,
        )
        signature_id, insert = added.prepare(new)
        return commit(signature_id, insert)

    def verify(
        self, record_id: str, version: int | None, admit: Gate
    ) -> list[tuple[Signature, Verdict, SignatureFormat]]:
        """Every signature of the version, each with its verdict and format (content
        read once: hashed as it streams, or held whole for a PDF that may embed some)."""
        signed = self._signatures.open(record_id, version, admit=admit)
        stored = signed.signatures()
        if not stored:
            return []
        if signed.info.kind is RecordKind.PDF and signed.info.size <= MAX_PADES_BYTES:
            with self._pdfs.slot():
                return self._verified(stored, *self._read_for_verify(signed))
        return self._verified(stored, *self._read_for_verify(signed))

    def _signed_pdf(self, signed: SignedRecord, identity: SignerIdentity) -> SignedPdf:
        pdf = read_bounded(signed.content)
        if not secrets.compare_digest(hashlib.sha256(pdf).digest(), signed.info.sha256):
            raise IntegrityError("stored record failed authentication")
        from service.signing.pades import sign_pdf  # noqa: PLC0415  (pyHanko, first use)

        return sign_pdf(identity.key, identity.certificate_der, pdf, self._chain)

    def _verified(
        self,
        stored: Sequence[Signature],
        digest: bytes,
        embedded: dict[bytes, EmbeddedPdfSignature],
    ) -> list[tuple[Signature, Verdict, SignatureFormat]]:
        results = []
        for s in stored:
            pdf_signature = embedded.get(s.p7s)
            if pdf_signature is not None:
                verdict = self._validator.validate_pdf(pdf_signature, s.signing_time)
                results.append((s, verdict, SignatureFormat.PADES))
            else:
                verdict = self._validator.validate(s.p7s, digest, s.signing_time)
                results.append((s, verdict, SignatureFormat.CADES_DETACHED))
        return results

    @staticmethod
    def _read_for_verify(signed: SignedRecord) -> tuple[bytes, dict[bytes, EmbeddedPdfSignature]]:
        """The content's SHA-256, and the PDF's embedded signatures by their CMS."""
        info = signed.info
        if info.kind is not RecordKind.PDF or info.size > MAX_PADES_BYTES:
            return content_digest(signed.content), {}
        pdf = read_bounded(signed.content)
        from service.signing.pades import embedded_by_cms  # noqa: PLC0415  (pyHanko, first use)

        return hashlib.sha256(pdf).digest(), embedded_by_cms(pdf)

    def get(self, signature_id: str, admit: Gate) -> Signature:
        """One stored signature (its record passes ``admit`` first)."""
        return self._signatures.get(signature_id, admit=admit)[1]
