"""Making and checking audit checkpoint signatures.

Checking uses only ``cryptography`` and the public key stored with the checkpoint, and
also requires that key to be the trusted one: a checkpoint an attacker signed with a
key of their own carries a valid signature, so the key itself must be pinned.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from keystore.interfaces import Signer
from storage.audit_model import Checkpoint, checkpoint_message


def make_checkpoint(
    signer: Signer, sequence: int, head_hash: bytes, created_at: datetime
) -> Checkpoint:
    """Sign (sequence, hash) with ``signer`` and return the checkpoint to store."""
    signature = signer.sign(checkpoint_message(sequence, head_hash))
    return Checkpoint(
        sequence=sequence,
        hash=head_hash,
        signature=signature,
        key_label=signer.key_label,
        public_key_der=signer.public_key_der(),
        created_at=created_at,
    )


def signature_valid(checkpoint: Checkpoint) -> bool:
    """Whether the checkpoint's signature verifies under its own stored public key."""
    message = checkpoint_message(checkpoint.sequence, checkpoint.hash)
    try:
        public = serialization.load_der_public_key(checkpoint.public_key_der)
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(checkpoint.signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(checkpoint.signature, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def signature_checker(trusted_public_key_der: bytes | None) -> Callable[[Checkpoint], bool]:
    """A checker accepting only checkpoints signed by the trusted key.

    With no trusted key every checkpoint fails: unverifiable is not verified.
    """

    def check(checkpoint: Checkpoint) -> bool:
        if trusted_public_key_der is None:
            return False
        if checkpoint.public_key_der != trusted_public_key_der:
            return False
        return signature_valid(checkpoint)

    return check
