"""The type check of backed-up values: what Python type each column's declared type
yields, and whether a value is of it (``holds``). The snapshot checks every value it
exports and every row it loads with this (:mod:`storage.backup.snapshot`); the schema's
constraints are checked after it (:mod:`storage.backup.constraints`).
"""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa

from storage.sqlite_text import StoredTime

ColumnKind = Literal["time", "boolean", "integer", "binary", "text"]


def column_kind(column: sa.Column[Any]) -> ColumnKind:
    """What Python type ``column``'s declared type yields (every backed-up column has
    one of these; a new kind of column is added here on purpose)."""
    kind = column.type
    if isinstance(kind, sa.DateTime | StoredTime):
        return "time"
    if isinstance(kind, sa.Boolean):
        return "boolean"
    if isinstance(kind, sa.Integer):  # BigInteger, SmallInteger
        return "integer"
    if isinstance(kind, sa.LargeBinary):
        return "binary"
    if isinstance(kind, sa.String):  # Text
        return "text"
    raise TypeError(f"column {column.name}: no type check for {type(kind).__name__}")


@functools.cache
def columns(table: sa.Table) -> tuple[tuple[str, ColumnKind, bool], ...]:
    """(name, kind, nullable) of each of ``table``'s columns, worked out once."""
    return tuple((c.name, column_kind(c), bool(c.nullable)) for c in table.c)


def holds(kind: ColumnKind, nullable: bool, value: object) -> bool:
    """True if ``value`` is of the Python type a column of ``kind`` yields (None only if
    ``nullable``): an ``int`` that is not a ``bool`` for an integer, a ``bool`` for a
    boolean, bytes for binary, ``str`` for text, a ``datetime`` for a time. Nothing is
    coerced."""
    if value is None:
        return nullable
    if kind == "binary":
        return isinstance(value, bytes | bytearray | memoryview)
    if kind == "time":
        return isinstance(value, datetime)
    return type(value) is _EXACT[kind]


_EXACT: dict[ColumnKind, type] = {"integer": int, "boolean": bool, "text": str}
