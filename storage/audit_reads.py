"""Reading the audit trail's SQL store: the chain head, events in sequence order or
by filter (in pages), and checkpoints.

Rows are read as stored (``storage.audit_rows``): a row holding a value the writer
never stores becomes a placeholder naming its fields, never a failed fetch. The
writer side is ``SqlAuditLog`` (``storage.audit_log``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC
from typing import Any, Final, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from storage.audit_errors import translated
from storage.audit_model import AuditFilter, ChainedEvent, Checkpoint
from storage.audit_rows import read_head, to_checkpoint, to_event
from storage.audit_sql import (
    HEAD_ID,
    SELECT_CHECKPOINTS,
    SELECT_EVENTS,
    audit_checkpoints,
    audit_events,
    audit_head,
    rows_as_read,
    time_parser,
)
from storage.sql_engine import connect
from storage.sqlite_text import bindable, text_as_read

T = TypeVar("T")

QUERY_BATCH: Final = 500  # rows per round trip when streaming a query


def _filtered(query: sa.Select[Any], flt: AuditFilter) -> sa.Select[Any]:
    """``query`` narrowed by every field of ``flt`` that is set."""
    c = audit_events.c
    conditions: list[sa.ColumnElement[bool]] = []
    if flt.since is not None:
        conditions.append(c.time >= flt.since.astimezone(UTC))
    if flt.until is not None:
        conditions.append(c.time < flt.until.astimezone(UTC))
    if flt.principal is not None:
        conditions.append(c.principal == flt.principal)
    if flt.patient_index is not None:
        conditions.append(c.patient_index == flt.patient_index)
    if flt.action is not None:
        conditions.append(c.action == flt.action)
    if flt.outcome is not None:
        conditions.append(c.outcome == flt.outcome)
    return query.where(*conditions) if conditions else query


def _compared(flt: AuditFilter) -> tuple[str, ...]:
    """The columns ``_filtered`` compares with a value of their type, for ``flt``."""
    fields = (("time", flt.since is not None or flt.until is not None),
              ("principal", flt.principal is not None),
              ("patient_index", flt.patient_index is not None),
              ("action", flt.action is not None), ("outcome", flt.outcome is not None))  # fmt: skip
    return tuple(name for name, used in fields if used)


class AuditReader:
    """The audit store's reads (``SqlAuditLog`` adds the writer)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        # Events are read with the time column raw and parsed per row (audit_rows), so
        # a stored value that does not parse marks its row instead of failing the fetch
        # (on PostgreSQL psycopg parses it, leniently: audit_sql.rows_as_read).
        self._parse_time = time_parser(engine.dialect)

    def head(self) -> tuple[int, bytes]:
        """The sequence and hash of the last committed event (0 and zeros when empty).

        ``AuditHeadMalformedError`` if the row holds a value the writer never stores.
        """
        query = sa.select(audit_head.c.sequence, audit_head.c.hash).where(
            audit_head.c.id == HEAD_ID
        )

        def select(c: Connection) -> Any:
            with text_as_read(c):
                return c.execute(query).one()

        row = self._run(select)
        return read_head(row.sequence, row.hash)

    def events(self, after_sequence: int = 0, limit: int = QUERY_BATCH) -> list[ChainedEvent]:
        """Up to ``limit`` events with sequence > ``after_sequence``, in sequence order."""
        query = (
            SELECT_EVENTS.where(audit_events.c.sequence > after_sequence)
            .order_by(audit_events.c.sequence)
            .limit(limit)
        )
        return [to_event(m, self._parse_time) for m in self._select_rows(query)]

    def query(self, flt: AuditFilter) -> Iterator[ChainedEvent]:
        """Events matching ``flt``, oldest first unless ``newest_first``; fetched in pages.

        A malformed row (``storage.audit_rows``) is yielded as a placeholder whose
        ``malformed`` names its fields, as ``events`` does: the caller leaves it out of
        what it shows and reports it (``service.audit.listing``); ``verify`` names it
        as altered. It counts against ``flt.limit``. Rows at sequence 0 or below are
        outside the chain and are not listed.
        """
        remaining = flt.limit
        cursor: Any = None
        seq = audit_events.c.sequence
        while remaining is None or remaining > 0:
            page = QUERY_BATCH if remaining is None else min(remaining, QUERY_BATCH)
            # The chain's positions only, as ``events`` (what verification walks): a row
            # a database writer put at 0 or below is in no chain and never shown.
            query = _filtered(SELECT_EVENTS, flt).where(seq > 0)
            if cursor is not None:
                query = query.where(seq < cursor if flt.newest_first else seq > cursor)
            query = query.order_by(seq.desc() if flt.newest_first else seq).limit(page)
            rows = self._select_rows(query, _compared(flt))
            for m in rows:
                yield to_event(m, self._parse_time)
            if len(rows) < page:
                return
            # As stored: the next page starts past it (text that is not UTF-8 included).
            cursor = bindable(rows[-1]["sequence"])
            if remaining is not None:
                remaining -= len(rows)

    def _select_rows(self, query: sa.Select[Any], compared: tuple[str, ...] = ()) -> list[Any]:
        """The rows' mappings, the time column unparsed (see ``__init__``), text that is
        not UTF-8 as ``Undecodable`` (``sqlite_text.text_as_read``) and, on PostgreSQL, a
        value psycopg cannot load as ``UNLOADABLE`` (``audit_sql.rows_as_read``).
        ``compared``: the columns the query's filter compares (``AuditColumnAlteredError``)."""

        def select(c: Connection) -> list[Any]:
            with rows_as_read(c):
                return [r._mapping for r in c.execute(query).all()]

        return self._run(select, compared=compared)

    def checkpoints(self, after_sequence: int = 0) -> list[Checkpoint]:
        """Checkpoints past ``after_sequence``, oldest first (one per N events: few).

        A malformed row is a placeholder naming its fields (``storage.audit_rows``).
        """
        query = SELECT_CHECKPOINTS.where(audit_checkpoints.c.sequence > after_sequence).order_by(
            audit_checkpoints.c.sequence
        )
        return [to_checkpoint(m, self._parse_time) for m in self._select_rows(query)]

    def last_checkpoint(self) -> Checkpoint | None:
        """The checkpoint with the highest sequence, or None (a placeholder if malformed)."""
        query = SELECT_CHECKPOINTS.order_by(audit_checkpoints.c.sequence.desc()).limit(1)
        rows = self._select_rows(query)
        return to_checkpoint(rows[0], self._parse_time) if rows else None

    def _run(
        self, fn: Callable[[Connection], T], *, write: bool = False, compared: tuple[str, ...] = ()
    ) -> T:
        """Run ``fn`` in one transaction (committed if ``write``), translating errors."""
        # Connected apart: a failure to connect is DatabaseUnreachableError (nothing
        # sent, so a put's object can go at once), unlike a connection lost later.
        with (
            translated(self._engine, compared),
            connect(self._engine, "audit database") as connection,
        ):
            if write:
                with connection.begin():
                    return fn(connection)
            return fn(connection)
