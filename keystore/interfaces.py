"""What the rest of medvault may ask of a key store: small Protocols split by ability.

``storage`` depends on these, never on PKCS#11, so SoftHSM2 and a hardware HSM swap by
configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A data key encrypted inside the token by master key (KEK) ``kek_version``."""

    kek_version: int
    blob: bytes


class KeyWrapper(Protocol):
    """Wraps and unwraps data keys with the current master key; the KEK never leaves."""

    def wrap(self, dek: bytes, associated_data: bytes) -> WrappedKey:
        """Encrypt ``dek`` under the current KEK, bound to ``associated_data``."""
        ...

    def unwrap(self, wrapped: WrappedKey, associated_data: bytes) -> bytes:
        """Return the data key; raise ``UnwrapError`` if it does not authenticate."""
        ...


class BlindIndexer(Protocol):
    """Keyed digest (HMAC-SHA256 in the token) for looking up values without storing them."""

    def blind_index(self, value: bytes) -> bytes:
        """Return the 32-byte HMAC of ``value`` under the index key."""
        ...


class Signer(Protocol):
    """Signs with one token-held private key; one role each (audit, backup, document).

    Signatures are over SHA-256 of ``data``: DER ``ECDSA-Sig-Value`` for EC keys,
    PKCS#1 v1.5 for RSA keys, so openssl and ``cryptography`` verify them unchanged.
    """

    @property
    def key_label(self) -> str:
        """Label of the private key on the token (e.g. ``medvault-audit-v1``)."""
        ...

    def sign(self, data: bytes) -> bytes:
        """Return the DER signature of SHA-256(``data``)."""
        ...

    def public_key_der(self) -> bytes:
        """The matching public key as DER SubjectPublicKeyInfo."""
        ...


class SignerFactory(Protocol):
    """Signers made on demand, each over one token-held key; the keys never leave.

    Roles: the audit and backup keys by their token label; document signers by name,
    with the certificate an operator imported for them.
    """

    def by_label(self, key_label: str) -> Signer:
        """The signer of key ``key_label``; ``KeyNotFoundError`` if the token lacks it."""
        ...

    def document_signer(self, name: str) -> Signer:
        """Signer ``name``'s key; ``SignerNotFoundError`` names the command to create it."""
        ...

    def document_certificate(self, name: str) -> bytes:
        """The DER certificate imported for signer ``name``; ``SignerNotFoundError``."""
        ...
