"""The schema's constraints, checked on each backed-up row as PostgreSQL and SQLite
enforce them, so that a backup that completes also loads.

A row of the right types (``column_types.holds``) can still break the schema: a SQLite
writer with ``PRAGMA ignore_check_constraints=ON``, a PostgreSQL writer who dropped a
CHECK, UNIQUE, primary-key or foreign-key constraint first, or a SQLite value that
PostgreSQL's types refuse. Copied as held, such a row made a backup that completed and
verified, then failed to load at restore time, PostgreSQL's refusal quoting the row.

Everything is derived from the SQLAlchemy tables (a test compares them with a migrated
database's own constraints), nothing is listed by hand:

- **per value**, in Python: a ``String(n)`` holds at most n characters (PostgreSQL's
  ``varchar(n)`` counts characters, as ``len`` does; SQLite ignores n); a
  ``LargeBinary(n)`` at most n bytes (neither database enforces n, but PostgreSQL's
  btree refuses an index entry past 2,704 bytes: medvault's are 32-byte digests, MACs
  and blind indexes, several indexed); ``Integer``, ``BigInteger`` and
  ``SmallInteger`` hold what PostgreSQL's ``integer``, ``bigint`` and ``smallint`` hold
  (SQLite keeps 64 bits in any); text holds no NUL (PostgreSQL's text cannot; SQLite's
  can) and no lone surrogate (a snapshot's JSON can spell one; no UTF-8 encodes it).
  NOT NULL is the type check's: ``holds`` takes None only where the column is nullable.
- **CHECK**: evaluated by SQLite itself, not re-implemented. Each row of a table with a
  CHECK is inserted into a probe: that table's own ``CREATE TABLE`` (columns, types,
  CHECKs; no keys) in a private in-memory database, rolled back every few hundred rows.
  The probe is not the source: a writer who dropped a constraint there (or redefined an
  operator) changes nothing here. After the checks above, values are of their declared
  types and within PostgreSQL's limits, and the expressions (``IS NULL``, ``IN``, ``=``,
  ``NOT``/``AND``/``OR`` over booleans) mean the same in both databases; a CHECK outside
  that portable subset would need a PostgreSQL probe as well.
- **PRIMARY KEY and UNIQUE**: a key of integers only by order (the export reads each
  table ordered by its primary key, and integers order the same everywhere, so a repeat
  is the previous row's key); any other key by a set of 128-bit BLAKE2b digests of the
  keys seen (a key holding a NULL conflicts with none, as in SQL).
- **FOREIGN KEY**: parents come first (``snapshot.tables``), so the digests of the keys
  a foreign key references are collected from the parent's rows, and a child's key must
  be among them (one holding a NULL references nothing: SQL's MATCH SIMPLE).

Memory: one digest (about 90 bytes in a set) per row and key that is not all integers
or that a foreign key references: two per ``records`` row (which keeps its manifest
entry in memory anyway), one per ``record_signatures`` and ``access_grants`` row. The
audit events, the table that grows fastest, cost nothing.

A :class:`Violation` names the table, the constraint or columns, and the row's key only
in the forms medvault writes (an integer, 32 hexadecimal digits): a database writer's
key can be anything, a patient's name too. Never a value.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import sqlalchemy as sa

from storage.backup.check_probe import CheckProbe

_SHOWN_TEXT = re.compile(r"[0-9a-f]{32}")
_TEXT_NUL = "a NUL character in text, which PostgreSQL's text cannot hold"
_SURROGATE = "text with a lone surrogate, which no UTF-8 encodes"
_REPEATED = "a key another row holds too"
_BINARY = (bytes, bytearray, memoryview)

Problem = tuple[str, tuple[str, ...]]  # (what, constraint or column names)
Row = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Violation:
    """A row that breaks a constraint: what, which constraint or columns, its key if shown."""

    table: str
    what: str
    names: tuple[str, ...]
    key: str = ""

    def __str__(self) -> str:
        row = f"a {self.table} row ({self.key})" if self.key else f"a {self.table} row"
        return f"{row} holds {self.what} ({', '.join(self.names)})"


@dataclass(frozen=True, slots=True)
class _Key:
    label: str  # the constraint's name, else what it is
    columns: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Reference:
    label: str
    columns: tuple[str, ...]
    parent: str
    parent_columns: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Rules:
    """What one table's rows must meet, worked out once from its definition."""

    lengths: tuple[tuple[str, int], ...]
    sizes: tuple[tuple[str, int], ...]  # LargeBinary(n): (column, n)
    ranges: tuple[tuple[str, int, int], ...]  # (column, least, most)
    texts: tuple[str, ...]
    shown: tuple[str, ...]  # the columns naming a row: its primary key, else a reference
    ordered: _Key | None  # a primary key of integers only
    unique: tuple[_Key, ...]  # every other primary or unique key
    references: tuple[_Reference, ...]


def _range(column: sa.Column[Any]) -> tuple[str, int, int]:
    """PostgreSQL's smallint, bigint or integer (SQLite keeps 64 bits in any)."""
    if isinstance(column.type, sa.SmallInteger):
        bits = 16
    else:
        bits = 64 if isinstance(column.type, sa.BigInteger) else 32
    return column.name, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _integer(column: sa.Column[Any]) -> bool:
    return isinstance(column.type, sa.Integer)


def _label(constraint: sa.Constraint, what: str, columns: Sequence[str]) -> str:
    name = constraint.name
    return str(name) if isinstance(name, str) else f"{what} ({', '.join(columns)})"


def _keys(table: sa.Table) -> tuple[_Key | None, list[_Key]]:
    """The primary key if ordered by (integers only), and the keys checked by digest."""
    pk = tuple(c.name for c in table.primary_key.columns)
    ordered, unique = None, []
    if pk:
        key = _Key(_label(table.primary_key, "primary key", pk), pk)
        if all(_integer(c) for c in table.primary_key.columns):
            ordered = key
        else:
            unique.append(key)
    for constraint in table.constraints:
        if isinstance(constraint, sa.UniqueConstraint) and not isinstance(
            constraint, sa.PrimaryKeyConstraint
        ):
            columns = tuple(c.name for c in constraint.columns)
            unique.append(_Key(_label(constraint, "unique", columns), columns))
    for index in table.indexes:
        if index.unique:
            columns = tuple(c.name for c in index.columns)
            unique.append(_Key(str(index.name), columns))
    return ordered, unique


def _rules(table: sa.Table) -> _Rules:
    texts = [(c.name, c.type.length) for c in table.c if isinstance(c.type, sa.String)]
    binaries = [(c.name, c.type.length) for c in table.c if isinstance(c.type, sa.LargeBinary)]
    references = [
        _Reference(
            _label(fk, "foreign key", [e.parent.name for e in fk.elements]),
            tuple(e.parent.name for e in fk.elements),
            fk.referred_table.name,
            tuple(e.column.name for e in fk.elements),
        )
        for fk in table.foreign_key_constraints
    ]
    pk = tuple(c.name for c in table.primary_key.columns)
    ordered, unique = _keys(table)
    return _Rules(
        lengths=tuple((name, length) for name, length in texts if length),
        sizes=tuple((name, most) for name, most in binaries if most),
        ranges=tuple(_range(c) for c in table.c if _integer(c)),
        texts=tuple(name for name, _ in texts),
        shown=pk or (references[0].columns if references else ()),
        ordered=ordered,
        unique=tuple(unique),
        references=tuple(references),
    )


def _limits(rules: _Rules, row: Row) -> Problem | None:
    """A value PostgreSQL's column type refuses (SQLite's takes it)."""
    long = [n for n, most in rules.lengths if isinstance(row[n], str) and len(row[n]) > most]
    if long:
        return "text longer than its column's declared length", tuple(long)
    big = [n for n, most in rules.sizes if isinstance(row[n], _BINARY) and len(row[n]) > most]
    if big:
        return "binary longer than its column's declared length", tuple(big)
    wide = [n for n, least, most in rules.ranges
            if isinstance(row[n], int) and not least <= row[n] <= most]  # fmt: skip
    if wide:
        return "an integer outside its column's range", tuple(wide)
    # One pass for both (most text is ASCII, where only a NUL can be wrong).
    odd = [n for n in rules.texts
           if isinstance(v := row[n], str) and ("\x00" in v or not v.isascii())]  # fmt: skip
    if not odd:
        return None
    nul = [n for n in odd if "\x00" in row[n]]
    if nul:
        return _TEXT_NUL, tuple(nul)
    lone = [n for n in odd if _unencodable(row[n])]
    return (_SURROGATE, tuple(lone)) if lone else None


def _unencodable(text: str) -> bool:
    """True if UTF-8 cannot encode ``text`` (a lone surrogate)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def _digest(row: Row, columns: tuple[str, ...]) -> bytes | None:
    """128 bits naming the key ``columns`` of ``row``; None if a column holds NULL."""
    values = tuple(row[c] for c in columns)
    if any(v is None for v in values):
        return None
    plain = tuple(bytes(v) if isinstance(v, bytearray | memoryview) else v for v in values)
    return hashlib.blake2b(repr(plain).encode(), digest_size=16).digest()


def shown_key(columns: Sequence[str], row: Row) -> str:
    """``id=..., version=3`` when every value is in a form medvault writes, else ""."""
    values = [row[c] for c in columns]
    if not values or not all(
        (type(v) is int) or (isinstance(v, str) and _SHOWN_TEXT.fullmatch(v)) for v in values
    ):
        return ""
    return ", ".join(f"{c}={v}" for c, v in zip(columns, values, strict=True))


class RowConstraints:
    """Checks rows of ``tables`` (in load order: parents first), one at a time, against
    their constraints (see the module docstring); a context manager (the probe)."""

    def __init__(self, tables: Sequence[sa.Table]) -> None:
        self._rules = {t.name: _rules(t) for t in tables}
        order = [t.name for t in tables]
        self._digests: dict[tuple[str, tuple[str, ...]], set[bytes]] = {}
        for name, rules in self._rules.items():
            for key in rules.unique:
                self._digests[name, key.columns] = set()
            for ref in rules.references:
                if ref.parent not in order or order.index(ref.parent) > order.index(name):
                    raise ValueError(f"{name} references {ref.parent}, which is not before it")
                self._digests[ref.parent, ref.parent_columns] = set()
        self._collected = {
            name: tuple(cols for table, cols in self._digests if table == name)
            for name in self._rules
        }
        self._last: dict[str, tuple[Any, ...]] = {}
        self._probe = CheckProbe(tables)

    def __enter__(self) -> RowConstraints:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:  # fmt: skip
        self._probe.close()

    def check(self, table: sa.Table, row: Row) -> Violation | None:
        """The first constraint ``row`` (of the right types) breaks, or None."""
        rules = self._rules[table.name]
        problem = (
            _limits(rules, row) or self._key_problem(table.name, rules, row)
            or self._check_problem(table.name, row)
        )  # fmt: skip
        if problem is None:
            return None
        return Violation(table.name, problem[0], problem[1], shown_key(rules.shown, row))

    def _check_problem(self, name: str, row: Row) -> Problem | None:
        check = self._probe.refusal(name, row)
        return None if check is None else ("values its CHECK constraint refuses", (check,))

    def _key_problem(self, name: str, rules: _Rules, row: Row) -> Problem | None:
        if rules.ordered is not None:
            key = tuple(row[c] for c in rules.ordered.columns)
            last = self._last.get(name)
            if last is not None and key <= last:
                what = _REPEATED if key == last else "a key out of its table's order"
                return what, (rules.ordered.label,)
            self._last[name] = key
        for ref in rules.references:
            digest = _digest(row, ref.columns)
            if digest is not None and digest not in self._digests[ref.parent, ref.parent_columns]:
                return f"a reference to no {ref.parent} row", (ref.label,)
        digests = {cols: _digest(row, cols) for cols in self._collected[name]}
        for unique in rules.unique:
            digest = digests[unique.columns]
            if digest is not None and digest in self._digests[name, unique.columns]:
                return _REPEATED, (unique.label,)
        for cols, digest in digests.items():
            if digest is not None:
                self._digests[name, cols].add(digest)
        return None


# SQLSTATEs of a row PostgreSQL refuses; their details quote the row, their names do not.
_SQLSTATE = {
    "23505": _REPEATED, "23514": "values a CHECK constraint refuses",
    "23503": "a reference to no row", "23502": "a NULL in a NOT NULL column",
    "22001": "text longer than its column's declared length",
    "22003": "a number outside its column's range", "22021": "text its encoding refuses",
    "22P05": "text its encoding refuses",
}  # fmt: skip
# SQLite's refusals name constraints or table.column only (no value); nothing else is kept.
_SQLITE_REFUSAL = re.compile(
    r"(UNIQUE|CHECK|NOT NULL|FOREIGN KEY) constraint failed(?:: ([\w.]+(?:, [\w.]+)*))?"
)


def load_refusal(table: str, error: sa.exc.DBAPIError) -> str:
    """Why the database refused a row of ``table``, without the row's values
    (PostgreSQL's detail, ``Failing row contains (...)`` or ``Key (...)=(...)``, quotes
    them): the SQLSTATE's meaning and the constraint and column PostgreSQL names, or
    SQLite's message when it is one of its constraint messages, else the error's class."""
    diag = getattr(error.orig, "diag", None)
    sqlstate = getattr(diag, "sqlstate", None)
    if diag is not None and sqlstate:
        what = _SQLSTATE.get(sqlstate, f"SQLSTATE {sqlstate}")
        names = [n for n in (diag.constraint_name, diag.column_name) if n]
    elif found := _SQLITE_REFUSAL.fullmatch(str(error.orig)):
        what, names = f"a row its {found[1]} constraint refuses", [found[2]] if found[2] else []
    else:
        what, names = f"a row it refuses ({type(error.orig).__name__})", []
    detail = f" ({', '.join(names)})" if names else ""
    return f"the database refused a {table} row of the snapshot: {what}{detail}"
