"""Key wrapping and blind indexing inside a PKCS#11 token; the keys never leave it.

Wrapped-key blob (the ``blob`` of :class:`~keystore.interfaces.WrappedKey`)::

    offset  size  field
    0       1     format version, 0x01
    1       12    GCM IV, random per wrap
    13      n     AES-256-GCM ciphertext of the data key (n = len(dek), 1..64)
    13+n    16    GCM tag

The GCM associated data is the caller's ``associated_data`` (record id and version),
so a wrapped key moved to another record fails to unwrap. The KEK version travels
beside the blob (``WrappedKey.kek_version``, a metadata column), not inside it.
With random 96-bit IVs a KEK must not wrap more than 2**32 keys; rotation
(:func:`keystore.admin.create_kek_version`) resets the count.
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.mechanisms import GCMParams
from pkcs11.types import DecryptMixin, EncryptMixin, SignMixin

from keystore.errors import KeyNotFoundError, KeystoreError, UnwrapError
from keystore.interfaces import WrappedKey
from keystore.pkcs11_session import Pkcs11SessionPool, one_shot

FORMAT_V1 = 0x01
IV_SIZE = 12
TAG_SIZE = 16
MAX_DEK_SIZE = 64
_HEADER_SIZE = 1 + IV_SIZE
SECRET = ObjectClass.SECRET_KEY

# What a token reports when GCM authentication or the blob layout is wrong. Session
# and device errors are deliberately absent: they mean "retry", not "tampered".
_AUTH_FAILURES: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.EncryptedDataInvalid,
    p11e.EncryptedDataLenRange,
    p11e.DataInvalid,
    p11e.DataLenRange,
    p11e.MechanismParamInvalid,
)
# Ambiguous: SoftHSM2 reports a failed GCM tag check as CKR_GENERAL_ERROR, but these are
# also what a token says when it hiccups. The unwrap is retried once on another session;
# only a second failure is taken for tampering.
_AMBIGUOUS_FAILURES: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.GeneralError,
    p11e.FunctionFailed,
)


class _AmbiguousFailureError(Exception):
    """An unwrap failed with a generic token error; it may have been the token, not the blob."""


_UNWRAP_FAILED = "wrapped key failed to authenticate"

_Ability = TypeVar("_Ability", EncryptMixin, DecryptMixin, SignMixin)


def _able(key: pkcs11.Key, ability: type[_Ability], label: str) -> _Ability:
    """Narrow ``key`` to what it must do; python-pkcs11 objects carry only their abilities."""
    if not isinstance(key, ability):
        raise KeyNotFoundError(f"key {label!r} cannot {ability.__name__[:-5].lower()}")
    return key


def kek_label(prefix: str, version: int) -> str:
    """Label of KEK ``version`` (``medvault-kek-v1``, ``-v2``...)."""
    return f"{prefix}{version}"


def list_kek_versions(session: pkcs11.Session, prefix: str) -> list[int]:
    """Versions of the AES KEKs on the token whose label is ``prefix`` + a number."""
    pattern = re.compile(re.escape(prefix) + r"([1-9][0-9]*)")
    found = session.get_objects(
        {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES}
    )
    versions = set()
    for obj in list(found):  # drain the search before touching objects
        match = pattern.fullmatch(obj[Attribute.LABEL])
        if match:
            versions.add(int(match.group(1)))
    return sorted(versions)


class Pkcs11KeyWrapper:
    """KeyWrapper over AES-256-GCM in the token, with versioned KEKs for rotation.

    The current version is the highest on the token. It is cached and rescanned every
    ``refresh_seconds`` (on the next wrap after that), so a rotation made by another
    replica reaches this one within that time; the rotating process calls ``refresh()``
    and switches at once. Unwrapping needs no refresh: it finds any version by label.
    """

    def __init__(self, pool: Pkcs11SessionPool, refresh_seconds: float = 10.0) -> None:
        self._pool = pool
        self._prefix = pool.config.kek_label_prefix
        self._current: int | None = None
        self._known: list[int] = []
        self._refresh_seconds = refresh_seconds
        self._due = 0.0
        self._lock = threading.Lock()

    def versions(self) -> list[int]:
        """All KEK versions on the token, oldest first."""
        return self._pool.run(lambda s: list_kek_versions(s, self._prefix))

    def refresh(self) -> int:
        """Rescan the token and make its highest KEK version the current one."""
        versions = self.versions()
        if not versions:
            raise KeyNotFoundError(
                f"no master key {kek_label(self._prefix, 1)} on token "
                f"{self._pool.config.token_label}; create it with ensure_keys "
                "(`medvault stack up` does so locally)"
            )
        with self._lock:
            changed, self._known = versions != self._known, versions
            self._current = versions[-1]
            self._due = time.monotonic() + self._refresh_seconds
        if changed:  # a version came or went: cached handles may name a destroyed key
            self._pool.forget_keys()
        return versions[-1]

    def current_version(self) -> int:
        """The KEK version new wraps use: cached, rescanned every ``refresh_seconds``."""
        with self._lock:
            current, now = self._current, time.monotonic()
            stale = current is not None and now >= self._due
            if stale:  # one caller rescans; the others keep using the cached version
                self._due = now + self._refresh_seconds
        if current is None:
            return self.refresh()
        if stale:
            try:
                return self.refresh()
            except KeystoreError:
                return current  # the token hiccupped; the wrap itself will say so if it lasts
        return current

    def wrap(self, dek: bytes, associated_data: bytes) -> WrappedKey:
        """Encrypt ``dek`` under the current KEK inside the token, bound to the data."""
        if not 1 <= len(dek) <= MAX_DEK_SIZE:
            raise ValueError(f"data key must be 1 to {MAX_DEK_SIZE} bytes, got {len(dek)}")
        version = self.current_version()
        label = kek_label(self._prefix, version)
        iv = os.urandom(IV_SIZE)
        params = GCMParams(iv, associated_data, TAG_SIZE * 8)

        def encrypt(session: pkcs11.Session) -> bytes:
            key = _able(self._pool.find_key(session, label, SECRET), EncryptMixin, label)
            return one_shot(key.encrypt(dek, mechanism=Mechanism.AES_GCM, mechanism_param=params))

        sealed = self._pool.run(encrypt)
        return WrappedKey(kek_version=version, blob=bytes([FORMAT_V1]) + iv + sealed)

    def unwrap(self, wrapped: WrappedKey, associated_data: bytes) -> bytes:
        """Decrypt a wrapped key inside the token; ``UnwrapError`` if it does not verify."""
        blob = wrapped.blob
        if (
            len(blob) < _HEADER_SIZE + TAG_SIZE + 1
            or len(blob) > _HEADER_SIZE + TAG_SIZE + MAX_DEK_SIZE
            or blob[0] != FORMAT_V1
        ):
            raise UnwrapError(_UNWRAP_FAILED)
        label = kek_label(self._prefix, wrapped.kek_version)
        params = GCMParams(blob[1:_HEADER_SIZE], associated_data, TAG_SIZE * 8)

        def decrypt(session: pkcs11.Session, *, last: bool) -> bytes:
            key = _able(self._pool.find_key(session, label, SECRET), DecryptMixin, label)
            try:
                return one_shot(
                    key.decrypt(
                        blob[_HEADER_SIZE:], mechanism=Mechanism.AES_GCM, mechanism_param=params
                    )
                )
            except _AUTH_FAILURES as e:
                raise UnwrapError(_UNWRAP_FAILED) from e
            except _AMBIGUOUS_FAILURES as e:
                if last:
                    raise UnwrapError(_UNWRAP_FAILED) from e
                self._pool.discard_after_use(session)
                raise _AmbiguousFailureError from e

        if wrapped.kek_version < 1:
            raise KeyNotFoundError(f"KEK version {wrapped.kek_version} does not exist")
        try:
            try:
                return self._pool.run(lambda s: decrypt(s, last=False))
            except _AmbiguousFailureError:
                return self._pool.run(lambda s: decrypt(s, last=True))
        except KeyNotFoundError as e:
            raise KeyNotFoundError(
                f"master key {label!r} (KEK version {wrapped.kek_version}) is not on token "
                f"{self._pool.config.token_label}: it was retired or deleted, or this is not "
                "the token this database was written with; restore the token from its backup"
            ) from e


class Pkcs11BlindIndexer:
    """BlindIndexer: HMAC-SHA256 in the token with the generic-secret index key."""

    def __init__(self, pool: Pkcs11SessionPool) -> None:
        self._pool = pool
        self._label = pool.config.index_key_label

    def blind_index(self, value: bytes) -> bytes:
        """Return the 32-byte HMAC-SHA256 of ``value`` under the index key."""

        def sign(session: pkcs11.Session) -> bytes:
            key = _able(self._pool.find_key(session, self._label, SECRET), SignMixin, self._label)
            return bytes(key.sign(value, mechanism=Mechanism.SHA256_HMAC))

        return self._pool.run(sign)
