"""Storage errors: one root, specific subclasses; vendor errors are wrapped ``from e``.

Messages never carry patient data, keys or object contents.
"""

from __future__ import annotations


class StorageError(Exception):
    """Root of every error the storage layer raises."""


class InvalidRecordError(StorageError):
    """Input that cannot be stored; names the field and the problem."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class RecordNotFoundError(StorageError):
    """No record (or no such version of it) exists."""


class RecordConflictError(StorageError):
    """The request conflicts with the stored state (e.g. amending a version that is not latest)."""


class RequestReusedError(RecordConflictError):
    """A PutRecord request id already stored a different record (another header or
    content): the caller reused a key it meant for another put."""


class IntegrityError(StorageError):
    """Stored data failed authentication or its digest: tampered, truncated, swapped.

    Deliberately opaque (as Tink does): which check failed is logged, not returned.
    """


class BackendUnavailableError(StorageError):
    """Object store, database or key store cannot be reached; retry later."""


class DatabaseUnreachableError(BackendUnavailableError):
    """No connection to the database could be had: nothing of the attempt was sent, so
    none of its changes can have committed (unlike a connection lost mid-transaction,
    whose COMMIT may have taken effect)."""


def never_reached_database(error: BaseException | None) -> bool:
    """Whether ``error`` was caused (anywhere along ``__cause__``) by a failure to
    connect at all, i.e. the attempt provably committed nothing."""
    while error is not None:
        if isinstance(error, DatabaseUnreachableError):
            return True
        error = error.__cause__
    return False


class SchemaRevisionError(StorageError):
    """The database's schema revision (``alembic_version``) is not one this release has:
    edited outside medvault, or written by a newer release. Not migrated, not opened."""


class KekRetiredError(BackendUnavailableError):
    """A wrapped key names a master-key version retired meanwhile; wrap again and retry.

    Raised by the insert guard of ``SqlMetadataStore``: a record is never committed with
    a key nobody can unwrap any more.
    """


class KekInUseError(RecordConflictError):
    """A master-key version cannot be retired: it is the active one or keys still use it."""


class DeadlineExceededError(StorageError):
    """The call this work serves is over (its deadline passed, or its client went away):
    the work stopped before its next step (DEADLINE_EXCEEDED; ``storage.deadlines``)."""
