"""CHECK constraints evaluated by SQLite itself on each row, not re-implemented.

A probe is a private in-memory SQLite database holding, for each table with a CHECK,
that table's own ``CREATE TABLE`` as SQLAlchemy renders it for SQLite: its columns,
types and CHECKs, no key (so rows need not be kept: they are rolled back every few
hundred). A row is inserted; SQLite's refusal names the constraint. The probe is not the
source database: a writer who dropped a constraint there (or redefined an operator)
changes nothing here. Values are bound as medvault binds them on SQLite: a time as its
UTC text, a boolean as 0 or 1, bytes as a BLOB. Through the DB-API directly: with
SQLAlchemy's per-statement work a row cost about ten times as much (0.5 ms).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

from storage.backup.column_types import column_kind

_ROLLBACK_AFTER = 256  # rows: the probe stays small
_CHECK_FAILED = re.compile(r"CHECK constraint failed: (\w+)")
_DIALECT = sqlite.dialect(paramstyle="qmark")

Bind = Callable[[Any], Any]


def _time(value: Any) -> Any:
    """A datetime as medvault's SQLite columns keep it (UTC text, microseconds)."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return value


def _binary(value: Any) -> Any:
    return bytes(value) if isinstance(value, bytearray | memoryview) else value


def _same(value: Any) -> Any:
    return value


_BINDS: dict[str, Bind] = {"time": _time, "binary": _binary}


def checks(table: sa.Table) -> list[sa.CheckConstraint]:
    """``table``'s CHECK constraints."""
    return [c for c in table.constraints if isinstance(c, sa.CheckConstraint)]


class _Probe:
    """One table's probe: its DDL, its insert, how each column's value is bound."""

    def __init__(self, table: sa.Table) -> None:
        copy = sa.Table(
            table.name, sa.MetaData(),
            *(sa.Column(c.name, c.type, nullable=c.nullable) for c in table.c),
            *(sa.CheckConstraint(c.sqltext, name=c.name) for c in checks(table)),
        )  # fmt: skip
        self.create = str(sa.schema.CreateTable(copy).compile(dialect=_DIALECT))
        insert = sa.insert(copy).values({c.name: sa.bindparam(c.name) for c in copy.c})
        compiled = insert.compile(dialect=_DIALECT)
        self.insert = str(compiled)
        order = compiled.positiontup or []
        self.binds = [(name, _BINDS.get(column_kind(table.c[name]), _same)) for name in order]
        self.names = {str(c.name) for c in checks(table)}


class CheckProbe:
    """Evaluates the CHECK constraints of ``tables`` on rows; ``close`` drops it."""

    def __init__(self, tables: Sequence[sa.Table]) -> None:
        self._probes = {t.name: _Probe(t) for t in tables if checks(t)}
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        for probe in self._probes.values():
            self._db.execute(probe.create)
        self._rows = 0

    def refusal(self, name: str, row: Mapping[str, Any]) -> str | None:
        """The name of the CHECK of table ``name`` that ``row`` breaks, or None."""
        probe = self._probes.get(name)
        if probe is None:
            return None
        try:
            self._db.execute(probe.insert, [bind(row[column]) for column, bind in probe.binds])
        except sqlite3.IntegrityError as e:
            found = _CHECK_FAILED.search(str(e))
            return found[1] if found and found[1] in probe.names else f"a CHECK of {name}"
        self._rows += 1
        if self._rows >= _ROLLBACK_AFTER:
            self._db.rollback()
            self._rows = 0
        return None

    def close(self) -> None:
        """Drop the probe database."""
        self._db.close()
