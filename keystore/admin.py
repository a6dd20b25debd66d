"""Create the token-resident keys medvault needs; every function here is idempotent.

Keys are generated inside the token as sensitive and non-extractable, so no process
(medvault included) ever sees their value. Each key may do one thing only: the KEK
encrypts and decrypts, the index key signs and verifies.
"""

from __future__ import annotations

from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11e

from keystore.config import Pkcs11Config
from keystore.errors import KeystoreError
from keystore.pkcs11_keys import kek_label, list_kek_versions
from keystore.pkcs11_session import Pkcs11SessionPool

KEK_BITS = 256
INDEX_KEY_BITS = 256

# Attributes every medvault key shares: on the token, behind the login, never exported.
_PROTECTED: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.MODIFIABLE: False,
}


def ensure_keys(pool: Pkcs11SessionPool, config: Pkcs11Config) -> list[str]:
    """Create KEK v1 and the index key if absent; return the labels created."""
    created: list[str] = []
    with pool.session() as session:
        if not list_kek_versions(session, config.kek_label_prefix):
            created.append(_generate_kek(session, config, 1))
        if not _has_key(session, config.index_key_label):
            created.append(_generate_index_key(session, config.index_key_label))
    if created:
        pool.forget_keys()
    return created


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


def _has_key(session: pkcs11.Session, label: str) -> bool:
    found = session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label})
    return bool(list(found))


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
