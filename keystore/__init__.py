"""PKCS#11 key store: data keys wrapped, identifiers indexed, documents signed in a token.

This module is the package's face: the rest of medvault imports from ``keystore``,
never from its submodules (import-linter checks it; docs/layers.md). Callers depend on
the Protocols (``KeyWrapper``, ``BlindIndexer``, ``Signer``, ``SignerFactory``); the
PKCS#11 implementations are exported for the composition root (``service.bootstrap``)
and the operator's token tools.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keystore.admin import (
        Pkcs11KekRing,
        SigningKeyKind,
        create_kek_version,
        ensure_keys,
    )
    from keystore.certificates import (
        CertificateMismatchError,
        Pkcs11Signers,
        SignerNotFoundError,
        SignerSummary,
        SignerUnusableError,
        create_signer_key,
        import_certificate,
        list_signers,
        load_certificate,
        make_csr,
        signer_label,
    )
    from keystore.config import (
        Pkcs11Config,
    )
    from keystore.errors import (
        KeyNotFoundError,
        KeystoreError,
        PinError,
        TokenDeadlineError,
        TokenUnavailableError,
        UnwrapError,
    )
    from keystore.interfaces import (
        BlindIndexer,
        KeyWrapper,
        Signer,
        SignerFactory,
        WrappedKey,
    )
    from keystore.pkcs11_keys import (
        Pkcs11BlindIndexer,
        Pkcs11KeyWrapper,
    )
    from keystore.pkcs11_session import (
        Pkcs11SessionPool,
        SessionLostError,
    )
    from keystore.signing import (
        Pkcs11Signer,
    )

# name -> the module that defines it. Resolved on first use (PEP 562), so importing one
# submodule (``keystore.errors`` in the CLI) does not load the whole package.
_EXPORTS: dict[str, str] = {
    "BlindIndexer": "keystore.interfaces",
    "create_kek_version": "keystore.admin",
    "create_signer_key": "keystore.certificates",
    "ensure_keys": "keystore.admin",
    "import_certificate": "keystore.certificates",
    "KeyNotFoundError": "keystore.errors",
    "KeystoreError": "keystore.errors",
    "KeyWrapper": "keystore.interfaces",
    "list_signers": "keystore.certificates",
    "load_certificate": "keystore.certificates",
    "make_csr": "keystore.certificates",
    "PinError": "keystore.errors",
    "Pkcs11BlindIndexer": "keystore.pkcs11_keys",
    "Pkcs11Config": "keystore.config",
    "Pkcs11KekRing": "keystore.admin",
    "Pkcs11KeyWrapper": "keystore.pkcs11_keys",
    "Pkcs11SessionPool": "keystore.pkcs11_session",
    "Pkcs11Signer": "keystore.signing",
    "Pkcs11Signers": "keystore.certificates",
    "SessionLostError": "keystore.pkcs11_session",
    "Signer": "keystore.interfaces",
    "SignerFactory": "keystore.interfaces",
    "SignerNotFoundError": "keystore.certificates",
    "SignerUnusableError": "keystore.certificates",
    "SigningKeyKind": "keystore.admin",
    "TokenDeadlineError": "keystore.errors",
    "TokenUnavailableError": "keystore.errors",
    "UnwrapError": "keystore.errors",
    "WrappedKey": "keystore.interfaces",
    "CertificateMismatchError": "keystore.certificates",
    "SignerSummary": "keystore.certificates",
    "signer_label": "keystore.certificates",
}

__all__ = [
    "BlindIndexer",
    "CertificateMismatchError",
    "KeyNotFoundError",
    "KeyWrapper",
    "KeystoreError",
    "PinError",
    "Pkcs11BlindIndexer",
    "Pkcs11Config",
    "Pkcs11KekRing",
    "Pkcs11KeyWrapper",
    "Pkcs11SessionPool",
    "Pkcs11Signer",
    "Pkcs11Signers",
    "SessionLostError",
    "Signer",
    "SignerFactory",
    "SignerNotFoundError",
    "SignerSummary",
    "SignerUnusableError",
    "SigningKeyKind",
    "TokenDeadlineError",
    "TokenUnavailableError",
    "UnwrapError",
    "WrappedKey",
    "create_kek_version",
    "create_signer_key",
    "ensure_keys",
    "import_certificate",
    "list_signers",
    "load_certificate",
    "make_csr",
    "signer_label",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
