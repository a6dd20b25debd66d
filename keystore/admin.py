"""Create the token-resident keys medvault needs; every function here is idempotent.

Keys are generated inside the token as sensitive and non-extractable, so no process
(medvault included) ever sees their value. Each key may do one thing only: the KEK
encrypts and decrypts, the index key signs and verifies, a signing key pair's private
half signs and its public half (a public token object, readable without login) verifies.
"""

from __future__ import annotations

from typing import Any, Literal

import pkcs11
from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import encode_named_curve_parameters

from keystore.config import Pkcs11Config
from keystore.errors import KeystoreError
from keystore.pkcs11_keys import kek_label, list_kek_versions
from keystore.pkcs11_session import Pkcs11SessionPool

KEK_BITS = 256
INDEX_KEY_BITS = 256
RSA_BITS = 2048
AUDIT_KEY_LABEL = "medvault-audit-v1"

SigningKeyKind = Literal["ec-p256", "rsa-2048"]

# Attributes every medvault key shares: on the token, behind the login, never exported.
_PROTECTED: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.MODIFIABLE: False,
}

# A signing key pair: the private half signs only; the public half verifies only and is
# readable without login, so verifiers and exports need no PIN.
_SIGN_PRIVATE: dict[Attribute, Any] = {
    **_PROTECTED,
    Attribute.SIGN: True,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
_SIGN_PUBLIC: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: False,
    Attribute.MODIFIABLE: False,
    Attribute.VERIFY: True,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
}


def ensure_keys(pool: Pkcs11SessionPool, config: Pkcs11Config) -> list[str]:
    """Create KEK v1 and the index key if absent; return the labels created."""
    created: list[str] = []
    with pool.session() as session:
        if not list_kek_versions(session, config.kek_label_prefix):
            created.append(_generate_kek(session, config, 1))
        if not _has_key(session, config.index_key_label):
            created.append(_generate_index_key(session, config.index_key_label))
        if not _has_key(session, AUDIT_KEY_LABEL, ObjectClass.PRIVATE_KEY):
            created.append(_generate_key_pair(session, AUDIT_KEY_LABEL, "ec-p256"))
    if created:
        pool.forget_keys()
    return created


def ensure_signing_key(
    pool: Pkcs11SessionPool, label: str, kind: SigningKeyKind = "ec-p256"
) -> bool:
    """Create the signing key pair ``label`` if absent; return True if it was created.

    An existing key of that label is kept whatever its kind: keys are never replaced.
    """
    with pool.session() as session:
        if _has_key(session, label, ObjectClass.PRIVATE_KEY):
            return False
        _generate_key_pair(session, label, kind)
    pool.forget_keys()
    return True


def create_kek_version(pool: Pkcs11SessionPool, config: Pkcs11Config) -> int:
    """Create the KEK after the highest existing version and return its version number.

    Wrappers pick it up for new wraps after ``Pkcs11KeyWrapper.refresh()``.
    """
    with pool.session() as session:
        versions = list_kek_versions(session, config.kek_label_prefix)
        version = (versions[-1] + 1) if versions else 1
        _generate_kek(session, config, version)
    pool.forget_keys()
    return version


def _has_key(
    session: pkcs11.Session, label: str, object_class: ObjectClass = ObjectClass.SECRET_KEY
) -> bool:
    found = session.get_objects({Attribute.CLASS: object_class, Attribute.LABEL: label})
    return bool(list(found))


def _generate_key_pair(session: pkcs11.Session, label: str, kind: SigningKeyKind) -> str:
    """Generate a sign-only key pair: private half protected, public half a token object."""
    private, public = dict(_SIGN_PRIVATE), dict(_SIGN_PUBLIC)
    try:
        if kind == "ec-p256":
            params = session.create_domain_parameters(
                KeyType.EC,
                {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                local=True,
            )
            params.generate_keypair(
                label=label, store=True, public_template=public, private_template=private
            )
        elif kind == "rsa-2048":
            session.generate_keypair(
                KeyType.RSA,
                RSA_BITS,
                label=label,
                store=True,
                public_template=public,
                private_template=private,
            )
        else:
            raise ValueError(f"unknown signing key kind {kind!r}; use ec-p256 or rsa-2048")
    except p11e.PKCS11Error as e:
        raise KeystoreError(
            f"cannot create key pair {label!r} on the token: {type(e).__name__}"
        ) from e
    return label


def _generate_kek(session: pkcs11.Session, config: Pkcs11Config, version: int) -> str:
    label = kek_label(config.kek_label_prefix, version)
    _generate(
        session,
        key_type=KeyType.AES,
        bits=KEK_BITS,
        label=label,
        capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
        extra={Attribute.WRAP: False, Attribute.UNWRAP: False, Attribute.DERIVE: False},
    )
    return label


def _generate_index_key(session: pkcs11.Session, label: str) -> str:
    _generate(
        session,
        key_type=KeyType.GENERIC_SECRET,
        bits=INDEX_KEY_BITS,
        label=label,
        capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
        extra={Attribute.ENCRYPT: False, Attribute.DECRYPT: False, Attribute.DERIVE: False},
    )
    return label


def _generate(
    session: pkcs11.Session,
    *,
    key_type: KeyType,
    bits: int,
    label: str,
    capabilities: MechanismFlag,
    extra: dict[Attribute, Any],
) -> None:
    """Generate one protected secret key on the token."""
    try:
        session.generate_key(
            key_type,
            bits,
            label=label,
            store=True,
            capabilities=capabilities,
            template={**_PROTECTED, **extra},
        )
    except p11e.PKCS11Error as e:
        raise KeystoreError(f"cannot create key {label!r} on the token: {type(e).__name__}") from e
