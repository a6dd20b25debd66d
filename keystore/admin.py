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
from keystore.errors import KeyNotFoundError, KeystoreError
from keystore.pkcs11_keys import Pkcs11KeyWrapper, kek_label, list_kek_versions
from keystore.pkcs11_session import Pkcs11SessionPool

KEK_BITS = 256
INDEX_KEY_BITS = 256
RSA_BITS = 2048
AUDIT_KEY_LABEL = "medvault-audit-v1"
BACKUP_KEY_LABEL = "medvault-backup-v1"  # signs backup manifests and drill reports

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
    """Create KEK v1, the index key and the audit and backup signing keys if absent;
    return the labels created."""
    created: list[str] = []
    with pool.session() as session:
        if not list_kek_versions(session, config.kek_label_prefix):
            created.append(_generate_kek(session, config, 1))
        if not _has_key(session, config.index_key_label):
            created.append(_generate_index_key(session, config.index_key_label))
        if not _has_key(session, AUDIT_KEY_LABEL, ObjectClass.PRIVATE_KEY):
            created.append(_generate_key_pair(session, AUDIT_KEY_LABEL, "ec-p256"))
        if not _has_key(session, BACKUP_KEY_LABEL, ObjectClass.PRIVATE_KEY):
            created.append(_generate_key_pair(session, BACKUP_KEY_LABEL, "ec-p256"))
    if created:
        pool.forget_keys()
    return created


def ensure_signing_key(
    pool: Pkcs11SessionPool,
    label: str,
    kind: SigningKeyKind = "ec-p256",
    key_id: bytes | None = None,
) -> bool:
    """Create the signing key pair ``label`` if absent; return True if it was created.

    An existing key of that label is kept whatever its kind: keys are never replaced.
    ``key_id`` becomes the pair's ``CKA_ID``, which a certificate stored beside the key
    shares (the convention PKCS#11 consumers use to pair keys and certificates).
    """
    with pool.session() as session:
        if _has_key(session, label, ObjectClass.PRIVATE_KEY):
            return False
        _generate_key_pair(session, label, kind, key_id)
    pool.forget_keys()
    return True


def create_kek_version(
    pool: Pkcs11SessionPool, config: Pkcs11Config, version: int | None = None
) -> int:
    """Create the KEK after the highest existing version and return its version number.

    ``version`` asks for a given number (the rotation claims it in the database first,
    so two replicas never create the same label); it must be above every existing one.
    Wrappers pick it up for new wraps after ``Pkcs11KeyWrapper.refresh()``.
    """
    with pool.session() as session:
        versions = list_kek_versions(session, config.kek_label_prefix)
        newest = versions[-1] if versions else 0
        if version is None:
            version = newest + 1
        elif version <= newest:
            raise KeystoreError(
                f"cannot create KEK version {version}: the token already has version {newest}"
            )
        _generate_kek(session, config, version)
    pool.forget_keys()
    return version


def destroy_kek_version(pool: Pkcs11SessionPool, config: Pkcs11Config, version: int) -> bool:
    """Delete KEK ``version`` from the token; True if it was there.

    Irreversible: every key wrapped by it becomes unreadable. The caller (the retire
    use case in ``storage.kek``) proves first that nothing uses it. The highest version
    is refused here too, as a last line of defence: it is the one new writes use.
    """
    label = kek_label(config.kek_label_prefix, version)
    with pool.session() as session:
        versions = list_kek_versions(session, config.kek_label_prefix)
        if versions and version >= versions[-1]:
            raise KeystoreError(f"refusing to delete {label}: it is the newest master key")
        found = list(
            session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label})
        )
        try:
            for obj in found:
                obj.destroy()
        except p11e.PKCS11Error as e:
            raise KeystoreError(f"cannot delete {label} from the token: {type(e).__name__}") from e
    pool.forget_keys()
    return bool(found)


class Pkcs11KekRing:
    """The master-key lifecycle on a token: list, create, make current, destroy.

    Shares the wrapper the record store uses, so a version created here is the one the
    store's next wrap uses, in this process at once.
    """

    def __init__(self, pool: Pkcs11SessionPool, wrapper: Pkcs11KeyWrapper) -> None:
        self._pool = pool
        self._wrapper = wrapper

    def versions(self) -> list[int]:
        """KEK versions on the token, oldest first."""
        return self._wrapper.versions()

    def current_version(self) -> int:
        """The version new wraps use in this process."""
        return self._wrapper.current_version()

    def refresh(self) -> int:
        """Rescan the token; return the (new) current version."""
        return self._wrapper.refresh()

    def create_version(self, version: int) -> None:
        """Create KEK ``version`` (above every existing one) and make it current here."""
        create_kek_version(self._pool, self._pool.config, version)
        current = self._wrapper.refresh()
        if current != version:
            raise KeyNotFoundError(f"created KEK v{version}, yet the token's newest is v{current}")

    def destroy_version(self, version: int) -> bool:
        """Delete KEK ``version`` from the token; True if it was there."""
        destroyed = destroy_kek_version(self._pool, self._pool.config, version)
        self._wrapper.refresh()
        return destroyed


def _has_key(
    session: pkcs11.Session, label: str, object_class: ObjectClass = ObjectClass.SECRET_KEY
) -> bool:
    found = session.get_objects({Attribute.CLASS: object_class, Attribute.LABEL: label})
    return bool(list(found))


def _generate_key_pair(
    session: pkcs11.Session, label: str, kind: SigningKeyKind, key_id: bytes | None = None
) -> str:
    """Generate a sign-only key pair: private half protected, public half a token object."""
    private, public = dict(_SIGN_PRIVATE), dict(_SIGN_PUBLIC)
    if key_id:
        private[Attribute.ID] = public[Attribute.ID] = key_id
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
