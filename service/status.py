"""The one table mapping domain errors to gRPC status codes.

Messages of mapped errors are written for the caller (they name the field or the
missing component, never patient data). Anything unmapped becomes INTERNAL with a
correlation id; its details go to the log only.
"""

from __future__ import annotations

import logging
import uuid

import grpc

from keystore import (
    KeyNotFoundError,
    KeystoreError,
    PinError,
    TokenDeadlineError,
    TokenUnavailableError,
    UnwrapError,
)
from service.audit import AuditUnavailableError
from service.authn import AuthenticationError, DelegationNotAllowedError
from service.authz import PermissionDeniedError
from service.limits import (
    PdfBusyError,
    StreamDeadlineError,
    TooManyCallsError,
    UploadsBusyError,
)
from service.streams import StreamCancelledError
from storage import (
    BackendUnavailableError,
    DeadlineExceededError,
    IntegrityError,
    InvalidRecordError,
    RecordConflictError,
    RecordNotFoundError,
)

log = logging.getLogger(__name__)

# Most specific first: the first matching class wins.
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (DelegationNotAllowedError, grpc.StatusCode.PERMISSION_DENIED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (AuditUnavailableError, grpc.StatusCode.UNAVAILABLE),  # fail closed: no event, no data
    (TooManyCallsError, grpc.StatusCode.RESOURCE_EXHAUSTED),  # this caller only, over share
    (UploadsBusyError, grpc.StatusCode.RESOURCE_EXHAUSTED),  # every upload slot taken
    (PdfBusyError, grpc.StatusCode.RESOURCE_EXHAUSTED),  # every whole-PDF slot taken
    (StreamDeadlineError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (StreamCancelledError, grpc.StatusCode.CANCELLED),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),  # the call's time ran out
    (InvalidRecordError, grpc.StatusCode.INVALID_ARGUMENT),
    (RecordNotFoundError, grpc.StatusCode.NOT_FOUND),
    (RecordConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (UnwrapError, grpc.StatusCode.DATA_LOSS),
    (BackendUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (TokenUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (PinError, grpc.StatusCode.UNAVAILABLE),
    (TokenDeadlineError, grpc.StatusCode.DEADLINE_EXCEEDED),  # no session within the call's time
    (KeyNotFoundError, grpc.StatusCode.FAILED_PRECONDITION),
    (KeystoreError, grpc.StatusCode.UNAVAILABLE),
)


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and caller-facing message for ``error``."""
    for cls, code in STATUS_TABLE:
        if isinstance(error, cls):
            return code, str(error)
    correlation = uuid.uuid4().hex[:12]
    # The traceback goes to the log (which holds no patient data by construction of the
    # domain errors); the caller gets only the correlation id.
    log.error("unexpected error", exc_info=error, extra={"correlation_id": correlation})
    return grpc.StatusCode.INTERNAL, f"internal error (correlation id {correlation})"
