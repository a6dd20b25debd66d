"""Document signatures: the use cases behind ``SigningService`` (sign, verify, get).

A record version is opened through ``storage.signatures`` (so patient scope and the
audit event come first), its plaintext is hashed while it streams (never held whole),
and the digest is signed in the token as a detached CAdES-BES ``.p7s``
(``service.signing.cms``) or checked against every stored signature
(``service.signing.validation``). Signer keys and certificates live on the token
(``keystore.certificates``).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509

from keystore import Signer as KeySigner
from keystore import SignerFactory, SignerUnusableError
from service.signing.cms import algorithm_name, sign_digest
from service.signing.validation import SignatureValidator, Verdict
from storage import Change, Gate, IntegrityError, NewSignature, RecordSignatures, Signature

# How long a signer's key handle and certificate are reused before the token is asked
# again (an operator may import a renewed certificate while the service runs).
SIGNER_CACHE_SECONDS = 60.0

# Stores a prepared signature (its id, the change inserting it) with its audit event.
CommitSignature = Callable[[str, Change[Signature]], Signature]


@dataclass(frozen=True, slots=True)
class SignerIdentity:
    """A token signer ready to sign: its key, its certificate (DER) and that parsed."""

    name: str
    key: KeySigner
    certificate_der: bytes
    certificate: x509.Certificate
    loaded_at: float


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
    ) -> None:
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
            cached = SignerIdentity(
                name, key, der, x509.load_der_x509_certificate(der), time.monotonic()
            )
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
        signed = self._signatures.open(record_id, version, admit=admit)
        digest = content_digest(signed.content)
        if not secrets.compare_digest(digest, signed.info.sha256):
            raise IntegrityError("stored record failed authentication")
        signing_time = datetime.now(UTC).replace(microsecond=0)
        p7s = sign_digest(identity.key, identity.certificate_der, digest, signing_time, self._chain)
        new = NewSignature(
            signer=name,
            certificate_subject=identity.certificate.subject.rfc4514_string(),
            algorithm=algorithm_name(identity.certificate_der),
            signing_time=signing_time,
            p7s=p7s,
        )
        signature_id, insert = signed.prepare(new)
        return commit(signature_id, insert)

    def verify(
        self, record_id: str, version: int | None, admit: Gate
    ) -> list[tuple[Signature, Verdict]]:
        """Every signature of the version, each with its verdict (content hashed once)."""
        signed = self._signatures.open(record_id, version, admit=admit)
        stored = signed.signatures()
        if not stored:
            return []
        digest = content_digest(signed.content)
        return [(s, self._validator.validate(s.p7s, digest, s.signing_time)) for s in stored]

    def get(self, signature_id: str, admit: Gate) -> Signature:
        """One stored signature (its record passes ``admit`` first)."""
        return self._signatures.get(signature_id, admit=admit)[1]
