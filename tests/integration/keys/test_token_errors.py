"""Token errors (item 8): lost sessions recover; missing keys and modules say what is wrong.

A "token restart" is simulated in this process with ``C_CloseAllSessions`` on the
token's slot, called through ctypes on the very module python-pkcs11 loaded: every
session, including the one holding the login, closes underneath the pool, exactly as
when an HSM restarts. The service-level missing-key case is in ``test_rotation``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from keystore import (
    KeyNotFoundError,
    Pkcs11KeyWrapper,
    Pkcs11SessionPool,
    TokenUnavailableError,
    WrappedKey,
)
from keystore.pkcs11_session import load_module
from service.status import status_for
from tests.fixtures.softhsm import SoftHsmToken

pytestmark = pytest.mark.integration
AD = b"medvault:record:v1:test"


# Runs in a child: SoftHSM2 lists tokens when the module loads, and this module's token
# is created after the test process loaded it.
_RESTART_SCRIPT = """
import ctypes, sys
from keystore import Pkcs11Config, Pkcs11KeyWrapper, Pkcs11SessionPool
config = Pkcs11Config(module_path=sys.argv[1], token_label=sys.argv[2], pin_env=None,
                      pin_file=sys.argv[3], pool_size=2)
ad = b"medvault:record:v1:test"
with Pkcs11SessionPool(config) as pool:
    wrapper = Pkcs11KeyWrapper(pool)
    wrapped = wrapper.wrap(b"d" * 32, ad)
    module = ctypes.CDLL(config.module_path)  # the library python-pkcs11 loaded
    rv = module.C_CloseAllSessions(ctypes.c_ulong(pool._token.slot.slot_id))
    assert rv == 0, hex(rv)
    assert wrapper.unwrap(wrapped, ad) == b"d" * 32
    assert wrapper.unwrap(wrapper.wrap(b"e" * 32, ad), ad) == b"e" * 32
print("recovered")
"""


def test_pool_recovers_after_sessions_close_underneath(
    softhsm_token: SoftHsmToken, keys_token: str
) -> None:
    """Every session and the login vanish (as in a token restart); the next calls work."""
    env = {**os.environ, "SOFTHSM2_CONF": str(softhsm_token.conf_path)}
    argv = [sys.executable, "-c", _RESTART_SCRIPT, softhsm_token.module_path, keys_token,
            str(softhsm_token.pin_file)]  # fmt: skip
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "recovered"


def test_missing_kek_version_names_the_label(keystore_pool: Pkcs11SessionPool) -> None:
    wrapper = Pkcs11KeyWrapper(keystore_pool)
    blob = wrapper.wrap(b"d" * 32, AD).blob
    with pytest.raises(KeyNotFoundError) as caught:
        wrapper.unwrap(WrappedKey(kek_version=99, blob=blob), AD)
    code, message = status_for(caught.value)
    assert code.name == "FAILED_PRECONDITION"
    assert "medvault-kek-v99" in message
    assert "restore the token" in message


def test_missing_module_is_unavailable_with_a_hint() -> None:
    with pytest.raises(TokenUnavailableError) as caught:
        load_module("/nonexistent/libpkcs11.so")
    code, message = status_for(caught.value)
    assert code.name == "UNAVAILABLE"
    assert "module not found" in message
