"""The audit trail as the service uses it: group-committed, checkpointed, verifiable.

``AuditTrail`` (in :mod:`service.audit.trail`) is the one way servicers record events;
its errors are defined here so the status table can map them without importing the
writer.
"""

from __future__ import annotations

from service.errors import ServiceError


class AuditError(ServiceError):
    """Root of the audit trail's errors."""


class AuditUnavailableError(AuditError):
    """The event could not be committed (database down, writer stopped): fail closed.

    Maps to UNAVAILABLE. The caller's event was not acknowledged; nothing that depends
    on it (a read's first byte) may happen.
    """


class AuditChainError(AuditError):
    """The chain no longer reaches a checkpoint this service witnessed: it will not sign.

    Raised by the checkpointer (never to a caller of ``record``): an incident is raised
    and ``verify`` reports the refusal.
    """


__all__ = ["AuditChainError", "AuditError", "AuditUnavailableError"]
