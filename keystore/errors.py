"""Keystore errors: one root, specific subclasses; vendor errors are wrapped ``from e``.

Messages name what is missing and how to fix it. They never carry a PIN, key bytes or
the data being wrapped.
"""

from __future__ import annotations


class KeystoreError(Exception):
    """Root of every error the keystore raises."""


class TokenUnavailableError(KeystoreError):
    """The PKCS#11 module, slot or token cannot be reached (module missing, token absent)."""


class PinError(KeystoreError):
    """The PIN is missing, wrong or locked."""


class KeyNotFoundError(KeystoreError):
    """A key the configuration names is not on the token."""


class UnwrapError(KeystoreError):
    """A wrapped key failed to authenticate: tampered, swapped or bound to other data."""


class TokenDeadlineError(KeystoreError):
    """The caller's time ran out before a token session was free (or before the
    operation began): the operation was not started."""
