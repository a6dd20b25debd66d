"""The service layer's error root; the gRPC status of each error is in ``service.status``.

Every error the service raises for a caller or an operator derives from ``ServiceError``
(as the storage layer's do from ``StorageError`` and the keystore's from
``KeystoreError``), so a caller can tell a refusal of the service from a fault of a
layer below. This module imports nothing of medvault: every service module may use it.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Root of the service layer's errors."""


__all__ = ["ServiceError"]
