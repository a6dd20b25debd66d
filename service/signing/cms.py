"""CMS SignedData, CAdES-BES, detached: made by pyHanko, signed in the token.

pyHanko builds the structure (signed attributes, SignerInfo, certificates); only the
raw signature over the DER of the signed attributes comes from the keystore's
:class:`~keystore.interfaces.Signer`, the same abstraction that signs audit checkpoints.

Signed attributes (RFC 5652 and ETSI EN 319 122-1, CAdES-BES):

* ``content-type``: id-data
* ``message-digest``: SHA-256 of the record's plaintext bytes
* ``signing-time``: the server's clock when it signed (UTC)
* ``signing-certificate-v2``: SHA-256 of the signer's certificate

The content is not encapsulated (detached): a verifier needs the exported record bytes
beside the ``.p7s``. The caller hashes the content while it streams, so a 4 GiB record
is never held in memory; pyHanko receives only the digest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from datetime import datetime

from asn1crypto import x509 as asn1_x509
from pyhanko.sign.signers.pdf_cms import PdfCMSSignedAttributes, Signer
from pyhanko_certvalidator.registry import SimpleCertificateStore

from keystore import Signer as KeySigner

DIGEST_ALGORITHM = "sha256"


def algorithm_name(certificate_der: bytes) -> str:
    """``ecdsa-sha256`` or ``rsa-pkcs1-sha256``: the name the API reports."""
    key = asn1_x509.Certificate.load(certificate_der).public_key
    return "ecdsa-sha256" if key.algorithm == "ec" else "rsa-pkcs1-sha256"


class TokenCmsSigner(Signer):
    """A pyHanko signer whose private-key operation happens in the PKCS#11 token.

    RSA signatures are PKCS#1 v1.5 (the keystore's mechanism), never PSS.
    """

    def __init__(
        self,
        key_signer: KeySigner,
        certificate: asn1_x509.Certificate,
        chain: Sequence[asn1_x509.Certificate] = (),
    ) -> None:
        store = SimpleCertificateStore()  # type: ignore[no-untyped-call]  # untyped in 0.33
        store.register_multiple(chain)
        super().__init__(
            prefer_pss=False, embed_roots=True, signing_cert=certificate, cert_registry=store
        )
        self._key_signer = key_signer

    async def async_sign_raw(
        self, data: bytes, digest_algorithm: str, dry_run: bool = False
    ) -> bytes:
        """Sign SHA-256(``data``) (the DER signed attributes) in the token."""
        if digest_algorithm != DIGEST_ALGORITHM:
            raise ValueError(f"only {DIGEST_ALGORITHM} is supported, not {digest_algorithm}")
        if dry_run:  # PAdES: pyHanko sizes the PDF's /Contents placeholder with this;
            return bytes(512)  # more than RSA-2048 (256) or DER ECDSA P-256 (<= 72) needs
        return self._key_signer.sign(data)


def sign_digest(
    key_signer: KeySigner,
    certificate_der: bytes,
    content_sha256: bytes,
    signing_time: datetime,
    chain: Iterable[bytes] = (),
) -> bytes:
    """A detached CAdES-BES ``.p7s`` (DER ContentInfo) over content whose SHA-256 is given.

    Blocking (the token signs); call it from a worker thread, never on an event loop.
    """
    certificate = asn1_x509.Certificate.load(certificate_der)
    signer = TokenCmsSigner(key_signer, certificate, [asn1_x509.Certificate.load(c) for c in chain])
    attributes = PdfCMSSignedAttributes(signing_time=signing_time)
    signed = asyncio.run(
        signer.async_sign(
            content_sha256,
            DIGEST_ALGORITHM,
            use_pades=True,  # selects the CAdES attribute set (signing-certificate-v2)
            is_pdf_sig=False,  # ...with signing-time, as CAdES (not PAdES) requires
            signed_attr_settings=attributes,
        )
    )
    return bytes(signed.dump())
