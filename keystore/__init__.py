"""PKCS#11 key store: data keys wrapped, identifiers indexed, inside a token.

The public surface is this module; the rest of medvault depends on the Protocols in
``keystore.interfaces`` and receives the concrete PKCS#11 objects from the composition
root.
"""

from keystore.admin import create_kek_version, ensure_keys
from keystore.config import Pkcs11Config
from keystore.errors import (
    KeyNotFoundError,
    KeystoreError,
    PinError,
    TokenUnavailableError,
    UnwrapError,
)
from keystore.interfaces import BlindIndexer, KeyWrapper, WrappedKey
from keystore.pkcs11_keys import Pkcs11BlindIndexer, Pkcs11KeyWrapper
from keystore.pkcs11_session import Pkcs11SessionPool, SessionLostError

__all__ = [
    "BlindIndexer",
    "KeyNotFoundError",
    "KeyWrapper",
    "KeystoreError",
    "PinError",
    "Pkcs11BlindIndexer",
    "Pkcs11Config",
    "Pkcs11KeyWrapper",
    "Pkcs11SessionPool",
    "SessionLostError",
    "TokenUnavailableError",
    "UnwrapError",
    "WrappedKey",
    "create_kek_version",
    "ensure_keys",
]
