"""Pkcs11SessionPool against the real SoftHSM2: start-up errors, threads, recovery."""

from __future__ import annotations

import ctypes
import os
import secrets
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from keystore import (
    KeyNotFoundError,
    PinError,
    Pkcs11BlindIndexer,
    Pkcs11KeyWrapper,
    Pkcs11SessionPool,
    TokenDeadlineError,
    TokenUnavailableError,
    pkcs11_session,
)
from keystore.pkcs11_session import find_token, load_module
from tests.fixtures.softhsm import WRONG_PIN_TOKEN_LABEL, SoftHsmToken

PIN_ENV = "MEDVAULT_TEST_WRONG_PIN"
WAIT = 30.0  # a bound on waiting for another thread, never a measured duration


def test_wrong_pin_is_a_pin_error_without_the_pin(
    softhsm_token: SoftHsmToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong_pin = secrets.token_urlsafe(12)
    monkeypatch.setenv(PIN_ENV, wrong_pin)
    config = replace(
        softhsm_token.config, token_label=WRONG_PIN_TOKEN_LABEL, pin_env=PIN_ENV, pin_file=None
    )
    with pytest.raises(PinError) as caught:
        Pkcs11SessionPool(config)
    message = str(caught.value)
    assert WRONG_PIN_TOKEN_LABEL in message
    assert PIN_ENV in message
    assert wrong_pin not in message
    assert wrong_pin not in repr(caught.value.__cause__)


def test_missing_token_label(softhsm_token: SoftHsmToken) -> None:
    config = replace(softhsm_token.config, token_label="medvault-no-such-token")
    with pytest.raises(TokenUnavailableError) as caught:
        Pkcs11SessionPool(config)
    assert "medvault-no-such-token" in str(caught.value)
    assert "softhsm2-util --init-token --free --label medvault-no-such-token" in str(caught.value)


def test_missing_module(softhsm_token: SoftHsmToken, tmp_path: Path) -> None:
    module = str(tmp_path / "libnothing.so")
    config = replace(softhsm_token.config, module_path=module)
    with pytest.raises(TokenUnavailableError, match="PKCS#11 module not found at") as caught:
        Pkcs11SessionPool(config)
    assert module in str(caught.value)


def test_missing_index_key_is_key_not_found(softhsm_token: SoftHsmToken) -> None:
    config = replace(softhsm_token.config, index_key_label="medvault-index-v404")
    with Pkcs11SessionPool(config) as pool, pytest.raises(KeyNotFoundError):
        Pkcs11BlindIndexer(pool).blind_index(b"x")


def test_closed_pool_refuses_sessions(softhsm_token: SoftHsmToken) -> None:
    pool = Pkcs11SessionPool(softhsm_token.config)
    pool.close()
    pool.close()
    with pytest.raises(Exception, match="closed"), pool.session():
        pass


def test_concurrent_wrap_unwrap(softhsm_token: SoftHsmToken) -> None:
    config = replace(softhsm_token.config, pool_size=4)
    failures: list[BaseException] = []
    wrong: list[int] = []
    with Pkcs11SessionPool(config) as pool:
        wrapper = Pkcs11KeyWrapper(pool)

        def worker(n: int) -> None:
            try:
                for i in range(200):
                    dek = os.urandom(32)
                    ad = f"record:{n}:{i}".encode()
                    if wrapper.unwrap(wrapper.wrap(dek, ad), ad) != dek:
                        wrong.append(n)
            except Exception as e:  # noqa: BLE001 - a thread must report, not die silently
                failures.append(e)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures
    assert not wrong


def _close_all_sessions(module_path: str, slot_id: int) -> None:
    """Do what a token restart does to us: C_CloseAllSessions on the token's slot."""
    module = ctypes.CDLL(module_path)  # the already-loaded module, same instance
    close_all = module.C_CloseAllSessions
    close_all.argtypes = [ctypes.c_ulong]
    close_all.restype = ctypes.c_ulong
    assert close_all(slot_id) == 0


# A search python-pkcs11 had open on a killed session is finalised when garbage collected
# and reports SessionHandleInvalid from __del__; that is the point of this test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_pool_recovers_after_sessions_closed_underneath(
    softhsm_token: SoftHsmToken, keystore_pool: Pkcs11SessionPool
) -> None:
    config = replace(softhsm_token.config, pool_size=3)
    with Pkcs11SessionPool(config) as pool:
        wrapper = Pkcs11KeyWrapper(pool)
        indexer = Pkcs11BlindIndexer(pool)
        dek = os.urandom(32)
        wrapped = wrapper.wrap(dek, b"ad")
        digest = indexer.blind_index(b"value")

        token = find_token(load_module(config.module_path), config)
        _close_all_sessions(config.module_path, token.slot.slot_id)

        assert wrapper.unwrap(wrapped, b"ad") == dek
        assert indexer.blind_index(b"value") == digest
        assert wrapper.unwrap(wrapper.wrap(dek, b"ad2"), b"ad2") == dek
    # The shared session-scoped pool lost its sessions too and recovers the same way.
    shared = Pkcs11KeyWrapper(keystore_pool)
    assert shared.unwrap(shared.wrap(dek, b"ad3"), b"ad3") == dek


def test_a_caller_out_of_time_starts_no_token_operation(softhsm_token: SoftHsmToken) -> None:
    """With every session lent, a caller with a deadline waits only as long as it has
    left (``time_left``), and one with no time left is refused at once; both get
    ``TokenDeadlineError`` and start nothing. A caller without a deadline is unchanged."""
    left: list[float | None] = [None]
    config = replace(softhsm_token.config, pool_size=1)
    with Pkcs11SessionPool(config, time_left=lambda: left[0]) as pool:
        lent, release = threading.Event(), threading.Event()

        def hold() -> None:
            with pool.session():
                lent.set()
                release.wait(30)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert lent.wait(10)
            for seconds in (0.2, 0.0):
                left[0] = seconds
                with pytest.raises(TokenDeadlineError, match="not started"):
                    pool.run(lambda session: session.generate_random(64))
        finally:
            release.set()
            holder.join(30)
        left[0] = None  # no deadline: waits for the session as before, and gets it
        assert len(pool.run(lambda session: session.generate_random(64))) == 8


class _Spy:
    """The module as ``find_token`` sees it, counting the re-reads it asks for instead
    of making them (other pools of this test process stay untouched)."""

    def __init__(self, lib: object) -> None:
        self._lib = lib
        self.rereads = 0

    def get_token(self, **kwargs: object) -> object:
        return self._lib.get_token(**kwargs)  # type: ignore[attr-defined]

    def reinitialize(self) -> None:
        self.rereads += 1


def test_no_reread_while_another_thread_builds_a_pool(
    softhsm_token: SoftHsmToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cold review 12: a token not found is looked for again after the module re-reads
    its tokens (C_Finalize, C_Initialize), only while no pool of the process holds a
    session. A pool another thread is building (token found, login not yet made) held
    none yet, so the module was finalized under its calls (SoftHSM2 runs without its
    locks here). Refused while another thread builds a pool; allowed once it is built
    and closed."""
    monkeypatch.setattr(pkcs11_session, "_logins", {})  # only this test's pools count
    found, go = threading.Event(), threading.Event()
    shared = pkcs11_session._shared

    def paused(config: Any, token: Any) -> Any:
        found.set()
        assert go.wait(WAIT)
        return shared(config, token)

    monkeypatch.setattr(pkcs11_session, "_shared", paused)
    pools: list[Pkcs11SessionPool] = []
    builder = threading.Thread(target=lambda: pools.append(Pkcs11SessionPool(softhsm_token.config)))
    builder.start()
    try:
        assert found.wait(WAIT)
        spy = _Spy(load_module(softhsm_token.config.module_path))
        wrong = replace(softhsm_token.config, token_label="medvault-no-such-token")
        with pytest.raises(TokenUnavailableError):
            find_token(spy, wrong)  # type: ignore[arg-type]
        assert spy.rereads == 0, "the module was re-read under a pool being built"
    finally:
        go.set()
        builder.join(WAIT)
    pools[0].close()
    with pytest.raises(TokenUnavailableError):
        find_token(spy, wrong)  # type: ignore[arg-type]
    assert spy.rereads > 0
