"""CMS SignedData, CAdES-BES, detached: assembled from DER built once per signer.

Signed attributes (RFC 5652 and ETSI EN 319 122-1, CAdES-BES):

* ``content-type``: id-data
* ``message-digest``: SHA-256 of the record's plaintext bytes
* ``signing-time``: the server's clock when it signed (UTC, UTCTime)
* ``signing-certificate-v2``: SHA-256 of the signer's certificate

The content is not encapsulated (detached): a verifier needs the exported record bytes
beside the ``.p7s``. Only the raw signature over the DER of the signed attributes comes
from the keystore's :class:`~keystore.interfaces.Signer`, the same abstraction that
signs audit checkpoints.

Why not pyHanko per signature: its ``Signer`` rebuilt and re-encoded the whole
structure with asn1crypto (certificates, issuer-and-serial, signing-certificate-v2)
for every signature, about 20 ms of CPU, and needed an event loop per call.
:class:`CadesSigner` builds every part that depends only on the signer (with pyHanko's
and asn1crypto's own builders, so the encodings are theirs) once, and per signature
encodes the two attributes that change (message digest, signing time) and
concatenates. The result is byte for byte what pyHanko's ``Signer.async_sign`` (CAdES
attribute set, ``embed_roots``) produces for the same inputs and raw signature;
``tests/unit/service/test_cades.py`` checks that against pyHanko itself.

DER rules kept here: a SET OF is encoded with its elements sorted by their encodings
(the signed attributes, the certificates), as asn1crypto does; lengths are definite.

:class:`TokenCmsSigner` remains the pyHanko signer that PAdES (``service.signing.pades``)
uses: pyHanko writes the PDF around it.

This module imports pyHanko: it is imported on first use only, when a signer's identity
is loaded or by the other modules that use pyHanko (see
:mod:`service.signing.asn1_registry`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from pyhanko.sign.general import as_signing_certificate_v2, simple_cms_attribute
from pyhanko.sign.signers.pdf_cms import Signer
from pyhanko_certvalidator.registry import SimpleCertificateStore

from keystore import Signer as KeySigner
from service.signing.asn1_registry import complete_name_maps

complete_name_maps()  # pyHanko has just been imported: service.signing.asn1_registry

DIGEST_ALGORITHM = "sha256"
DIGEST_SIZE = 32
# UTCTime (RFC 5280 and RFC 5652: signing times before 2050 are UTCTime).
_UTC_TIME_YEARS = range(1950, 2050)


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


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    size = (n.bit_length() + 7) // 8
    return bytes((0x80 | size,)) + n.to_bytes(size, "big")


def _tlv(tag: int, *parts: bytes) -> bytes:
    """One DER element: ``tag``, definite length, the concatenated ``parts``."""
    body = b"".join(parts)
    return bytes((tag,)) + _length(len(body)) + body


_SEQUENCE, _SET, _OCTET_STRING, _UTC_TIME, _CONTEXT_0 = 0x30, 0x31, 0x04, 0x17, 0xA0
_VERSION_1 = core.Integer(1).dump()
_SIGNED_DATA_TYPE = cms.ContentType("signed_data").dump()
_MESSAGE_DIGEST_TYPE = cms.CMSAttributeType("message_digest").dump()
_SIGNING_TIME_TYPE = cms.CMSAttributeType("signing_time").dump()
# (simple_cms_attribute is untyped in pyHanko 0.33.)
_CONTENT_TYPE_ATTRIBUTE = simple_cms_attribute("content_type", "data").dump()  # type: ignore[no-untyped-call]
# EncapsulatedContentInfo of a detached signature: id-data, no content.
_ENCAP_CONTENT_INFO = cms.EncapsulatedContentInfo({"content_type": "data"}).dump()


def _signing_time_attribute(when: datetime) -> bytes:
    utc = when.astimezone(UTC)
    if utc.year not in _UTC_TIME_YEARS:
        raise ValueError("signing_time must be in 1950-2049 (UTCTime)")
    text = utc.strftime("%y%m%d%H%M%SZ").encode("ascii")
    return _tlv(_SEQUENCE, _SIGNING_TIME_TYPE, _tlv(_SET, _tlv(_UTC_TIME, text)))


class CadesSigner:
    """Detached CAdES-BES signatures by one token signer; the fixed parts built once.

    Thread-safe (immutable after construction; the key signer is the token's).
    """

    def __init__(
        self, key_signer: KeySigner, certificate_der: bytes, chain: Iterable[bytes] = ()
    ) -> None:
        certificate = asn1_x509.Certificate.load(certificate_der)
        mechanism = TokenCmsSigner(key_signer, certificate).get_signature_mechanism_for_digest(
            DIGEST_ALGORITHM
        )
        self._key_signer = key_signer
        digest_algorithm = algos.DigestAlgorithm({"algorithm": DIGEST_ALGORITHM}).dump()
        sid = cms.SignerIdentifier(
            {"issuer_and_serial_number": {
                "issuer": certificate.issuer, "serial_number": certificate.serial_number,
            }}
        ).dump()  # fmt: skip
        self._signer_info_head = _VERSION_1 + sid + digest_algorithm
        self._signature_algorithm = mechanism.dump()
        signing_certificate = as_signing_certificate_v2(certificate)
        self._signing_certificate = simple_cms_attribute(  # type: ignore[no-untyped-call]
            "signing_certificate_v2", signing_certificate
        ).dump()
        # The signer's certificate first in pyHanko's set, the chain after; a SET OF
        # is sorted, and a certificate given twice is embedded once.
        certificates = {certificate.dump(), *(asn1_x509.Certificate.load(c).dump() for c in chain)}
        self._signed_data_head = (
            _VERSION_1
            + _tlv(_SET, digest_algorithm)
            + _ENCAP_CONTENT_INFO
            + _tlv(_CONTEXT_0, *sorted(certificates))
        )

    def signed_attributes(self, content_sha256: bytes, signing_time: datetime) -> bytes:
        """The SET OF signed attributes (its DER is what the token signs)."""
        if len(content_sha256) != DIGEST_SIZE:
            raise ValueError(f"content_sha256 must be {DIGEST_SIZE} bytes")
        message_digest = _tlv(
            _SEQUENCE, _MESSAGE_DIGEST_TYPE, _tlv(_SET, _tlv(_OCTET_STRING, content_sha256))
        )
        attributes = (
            _CONTENT_TYPE_ATTRIBUTE,
            _signing_time_attribute(signing_time),
            message_digest,
            self._signing_certificate,
        )
        return _tlv(_SET, *sorted(attributes))

    def sign(self, content_sha256: bytes, signing_time: datetime) -> bytes:
        """A detached CAdES-BES ``.p7s`` (DER ContentInfo) over content whose SHA-256 is
        given, signed now in the token.

        Blocking (the token signs); call it from a worker thread, never on an event loop.
        """
        attributes = self.signed_attributes(content_sha256, signing_time)
        return self.assemble(attributes, self._key_signer.sign(attributes))

    def assemble(self, signed_attributes: bytes, signature: bytes) -> bytes:
        """The ContentInfo around ``signed_attributes`` and their raw ``signature``."""
        # In SignerInfo the SET OF is [0] IMPLICIT: same body, context tag.
        implicit = bytes((_CONTEXT_0,)) + signed_attributes[1:]
        signer_info = _tlv(
            _SEQUENCE, self._signer_info_head, implicit, self._signature_algorithm,
            _tlv(_OCTET_STRING, signature),
        )  # fmt: skip
        signed_data = _tlv(_SEQUENCE, self._signed_data_head, _tlv(_SET, signer_info))
        return _tlv(_SEQUENCE, _SIGNED_DATA_TYPE, _tlv(_CONTEXT_0, signed_data))
