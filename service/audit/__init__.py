"""The audit trail as the service uses it: group-committed, checkpointed, verifiable.

``AuditTrail`` (in :mod:`service.audit.trail`) is the one way servicers record events;
its errors are defined here so the status table can map them without importing the
writer.
"""

from __future__ import annotations


class AuditError(Exception):
    """Root of the audit trail's errors."""


class AuditUnavailableError(AuditError):
    """The event could not be committed (database down, writer stopped): fail closed.

    Maps to UNAVAILABLE. The caller's event was not acknowledged; nothing that depends
    on it (a read's first byte) may happen.
    """


__all__ = ["AuditError", "AuditUnavailableError"]
