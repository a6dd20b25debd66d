"""How the audit database's driver errors become storage errors: an outage is
``BackendUnavailableError``, a value the database refuses ``AuditEventRejectedError``,
a filtered column retyped ``AuditColumnAlteredError``; messages name no row data.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from sqlalchemy import exc
from sqlalchemy.engine import Engine

from storage.errors import (
    BackendUnavailableError,
    IntegrityError,
    StorageError,
)


class AuditEventRejectedError(StorageError):
    """The database refused an event or a batch for its content, not for an outage
    (e.g. a value it cannot store): retrying the events one by one isolates it."""


class AuditColumnAlteredError(IntegrityError):
    """A filtered listing's column no longer has the type the audit writer created:
    PostgreSQL cannot compare it with the filter's value (a database writer retyped it).
    Names the columns, never a value; an integrity failure, not an outage."""

    def __init__(self, columns: tuple[str, ...]) -> None:
        self.columns = columns
        named = " or ".join(f"audit_events.{c}" for c in columns)
        super().__init__(
            f"{named} altered: its type is not the one the audit writer created; "
            "run `medvault audit verify`"
        )


# PostgreSQL's undefined_function (no operator for the column's type and the value's)
# and datatype_mismatch: on a filter's column, the column's type was changed.
_TYPE_ALTERED: Final = frozenset({"42883", "42804"})


class DuplicateAuditRowError(StorageError):
    """A row with that key exists already (``SqlAuditLog`` handles it: ``add_checkpoint``
    returns False, an append fails closed)."""


# InternalError covers PostgreSQL's read-only transactions (hot standby, or
# default_transaction_read_only); ProgrammingError a missing table (not migrated);
# TimeoutError is the connection pool's.
_OUTAGES = (
    exc.OperationalError,
    exc.InterfaceError,
    exc.InternalError,
    exc.ProgrammingError,
    exc.TimeoutError,
)


@contextmanager
def translated(engine: Engine, compared: tuple[str, ...] = ()) -> Iterator[None]:
    """Driver errors become storage errors; the message names no row data.

    ``compared``: the columns the statement compares with values of their own type; a
    comparison PostgreSQL no longer has an operator for is ``AuditColumnAlteredError``.
    """
    try:
        yield
    except exc.IntegrityError as e:
        raise DuplicateAuditRowError("audit row exists already") from e
    except exc.ProgrammingError as e:
        if compared and getattr(e.orig, "sqlstate", None) in _TYPE_ALTERED:
            raise AuditColumnAlteredError(compared) from None  # its text may quote a value
        raise _unavailable(engine, e) from e
    except _OUTAGES as e:
        raise _unavailable(engine, e) from e
    except (exc.DBAPIError, exc.StatementError, ValueError) as e:
        # Refused for what was sent (a value the column or driver cannot take).
        raise AuditEventRejectedError(f"audit database refused a value ({type(e).__name__})") from e
    except exc.NoResultFound as e:
        raise BackendUnavailableError("audit head row missing; run the migrations") from e
    except exc.SQLAlchemyError as e:
        raise StorageError(f"audit database error ({type(e).__name__})") from e


def _unavailable(engine: Engine, e: Exception) -> BackendUnavailableError:
    """The database cannot be written now (unreachable, locked, read-only): every
    caller fails closed, and retrying event by event would only wait longer."""
    url = engine.url
    where = (
        "local SQLite file"
        if engine.dialect.name == "sqlite"
        else f"{url.host or 'localhost'}:{url.port or 'default port'}"
    )
    name = type(e.orig).__name__ if isinstance(e, exc.DBAPIError) else type(e).__name__
    return BackendUnavailableError(f"audit database unavailable at {where} ({name}); retry later")
