"""Pkcs11KeyWrapper and Pkcs11BlindIndexer against the real SoftHSM2 test token."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.types import DecryptMixin

from keystore import (
    KeyNotFoundError,
    Pkcs11BlindIndexer,
    Pkcs11KeyWrapper,
    Pkcs11SessionPool,
    UnwrapError,
    WrappedKey,
    create_kek_version,
)
from keystore.pkcs11_keys import FORMAT_V1, IV_SIZE, TAG_SIZE
from tests.fixtures.softhsm import SoftHsmToken

AD_A = b"record:0001/version:1"
AD_B = b"record:0002/version:1"


@pytest.fixture
def wrapper(keystore_pool: Pkcs11SessionPool) -> Pkcs11KeyWrapper:
    return Pkcs11KeyWrapper(keystore_pool)


def test_round_trip(wrapper: Pkcs11KeyWrapper) -> None:
    dek = os.urandom(32)
    wrapped = wrapper.wrap(dek, AD_A)
    assert wrapped.blob[0] == FORMAT_V1
    assert len(wrapped.blob) == 1 + IV_SIZE + len(dek) + TAG_SIZE
    assert dek not in wrapped.blob
    assert wrapper.unwrap(wrapped, AD_A) == dek


def test_fresh_iv_per_wrap(wrapper: Pkcs11KeyWrapper) -> None:
    dek = os.urandom(32)
    first, second = wrapper.wrap(dek, AD_A), wrapper.wrap(dek, AD_A)
    assert first.blob[1 : 1 + IV_SIZE] != second.blob[1 : 1 + IV_SIZE]
    assert first.blob != second.blob


def test_other_associated_data_fails(wrapper: Pkcs11KeyWrapper) -> None:
    wrapped = wrapper.wrap(os.urandom(32), AD_A)
    with pytest.raises(UnwrapError):
        wrapper.unwrap(wrapped, AD_B)


@pytest.mark.parametrize("position", [0, 1, 12, 13, 20, -1])
def test_flipped_byte_fails(wrapper: Pkcs11KeyWrapper, position: int) -> None:
    wrapped = wrapper.wrap(os.urandom(32), AD_A)
    blob = bytearray(wrapped.blob)
    blob[position] ^= 0x01
    with pytest.raises(UnwrapError) as caught:
        wrapper.unwrap(replace(wrapped, blob=bytes(blob)), AD_A)
    assert str(caught.value) == "wrapped key failed to authenticate"


@pytest.mark.parametrize("length", [0, 1, 13, 29, 200])
def test_wrong_length_fails(wrapper: Pkcs11KeyWrapper, length: int) -> None:
    version = wrapper.current_version()
    blob = bytes([FORMAT_V1]) + bytes(max(length - 1, 0))
    with pytest.raises(UnwrapError):
        wrapper.unwrap(WrappedKey(version, blob[:length]), AD_A)


def test_swapped_blobs_fail(wrapper: Pkcs11KeyWrapper) -> None:
    wrapped_a = wrapper.wrap(os.urandom(32), AD_A)
    wrapped_b = wrapper.wrap(os.urandom(32), AD_B)
    with pytest.raises(UnwrapError):
        wrapper.unwrap(wrapped_a, AD_B)
    with pytest.raises(UnwrapError):
        wrapper.unwrap(wrapped_b, AD_A)


def test_missing_kek_version(wrapper: Pkcs11KeyWrapper) -> None:
    wrapped = wrapper.wrap(os.urandom(32), AD_A)
    for version in (999, 0):
        with pytest.raises(KeyNotFoundError):
            wrapper.unwrap(replace(wrapped, kek_version=version), AD_A)


def test_rejects_empty_or_oversized_dek(wrapper: Pkcs11KeyWrapper) -> None:
    for dek in (b"", bytes(65)):
        with pytest.raises(ValueError, match="data key"):
            wrapper.wrap(dek, AD_A)


def test_blind_index(keystore_pool: Pkcs11SessionPool) -> None:
    indexer = Pkcs11BlindIndexer(keystore_pool)
    first = indexer.blind_index(b"PID-000123")
    assert len(first) == 32
    assert indexer.blind_index(b"PID-000123") == first
    assert indexer.blind_index(b"PID-000124") != first
    assert Pkcs11BlindIndexer(keystore_pool).blind_index(b"PID-000123") == first


def test_keys_are_sensitive_and_not_extractable(
    keystore_pool: Pkcs11SessionPool, softhsm_token: SoftHsmToken
) -> None:
    config = softhsm_token.config
    with keystore_pool.session() as session:
        for label in (f"{config.kek_label_prefix}1", config.index_key_label):
            key = session.get_key(object_class=ObjectClass.SECRET_KEY, label=label)
            assert key[Attribute.SENSITIVE] is True
            assert key[Attribute.EXTRACTABLE] is False
            assert key[Attribute.NEVER_EXTRACTABLE] is True
            assert key[Attribute.TOKEN] is True
            assert key[Attribute.PRIVATE] is True
            with pytest.raises(p11e.AttributeSensitive):
                key[Attribute.VALUE]
        kek = session.get_key(
            object_class=ObjectClass.SECRET_KEY, label=f"{config.kek_label_prefix}1"
        )
        assert kek[Attribute.ENCRYPT] is True
        assert kek[Attribute.SIGN] is False
        assert kek[Attribute.WRAP] is False


def test_rotation_keeps_old_blobs_readable(
    keystore_pool: Pkcs11SessionPool, softhsm_token: SoftHsmToken
) -> None:
    wrapper = Pkcs11KeyWrapper(keystore_pool)
    old_version = wrapper.current_version()
    dek = os.urandom(32)
    old = wrapper.wrap(dek, AD_A)

    new_version = create_kek_version(keystore_pool, softhsm_token.config)
    assert new_version == old_version + 1
    assert wrapper.current_version() == old_version  # cached until refresh
    assert wrapper.refresh() == new_version
    assert wrapper.versions()[-1] == new_version

    fresh = wrapper.wrap(dek, AD_A)
    assert fresh.kek_version == new_version
    assert wrapper.unwrap(fresh, AD_A) == dek
    assert wrapper.unwrap(old, AD_A) == dek
    with pytest.raises(UnwrapError):
        wrapper.unwrap(replace(old, kek_version=new_version), AD_A)
    # A wrapper created after the rotation starts on the newest KEK.
    assert Pkcs11KeyWrapper(keystore_pool).wrap(dek, AD_A).kek_version == new_version


class _Flaky(DecryptMixin):
    """A token key whose first decrypt fails with a generic token error."""

    def __init__(self, key: DecryptMixin, error: type[p11e.PKCS11Error]) -> None:
        self._key = key
        self._error: type[p11e.PKCS11Error] | None = error

    def decrypt(
        self, data: bytes | Iterator[bytes], buffer_size: int = 8192, **kwargs: Any
    ) -> bytes | Iterator[bytes]:
        if self._error is not None:
            error, self._error = self._error, None
            raise error()
        return self._key.decrypt(data, buffer_size, **kwargs)


@pytest.mark.parametrize("error", [p11e.GeneralError, p11e.FunctionFailed])
def test_token_hiccup_is_retried_not_tampering(
    wrapper: Pkcs11KeyWrapper,
    keystore_pool: Pkcs11SessionPool,
    monkeypatch: pytest.MonkeyPatch,
    error: type[p11e.PKCS11Error],
) -> None:
    dek = os.urandom(32)
    wrapped = wrapper.wrap(dek, AD_A)
    real_find = keystore_pool.find_key
    flaky: list[_Flaky] = []
    sessions: list[object] = []

    def find_key(session: Any, label: str, object_class: ObjectClass) -> Any:
        sessions.append(session)
        if not flaky:
            key = real_find(session, label, object_class)
            assert isinstance(key, DecryptMixin)
            flaky.append(_Flaky(key, error))
            return flaky[0]
        return real_find(session, label, object_class)

    monkeypatch.setattr(keystore_pool, "find_key", find_key)
    assert wrapper.unwrap(wrapped, AD_A) == dek
    assert len(sessions) == 2
    assert sessions[0] is not sessions[1]  # the retry ran on another session
