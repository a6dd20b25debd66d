"""The backup's constraint checks on a schema of the test's own (no database but the
in-memory probe): what each kind of constraint refuses, SQL's NULL rules, what a
violation shows, and how a database's refusal is named without the row's values."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from storage.backup.constraints import RowConstraints, load_refusal, shown_key
from storage.backup.snapshot import tables

_schema = sa.MetaData()
parent = sa.Table(
    "parent", _schema,
    sa.Column("id", sa.String(32), nullable=False),
    sa.Column("n", sa.SmallInteger, nullable=False),
    sa.Column("code", sa.String(4), nullable=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("digest", sa.LargeBinary(4), nullable=True),
    sa.PrimaryKeyConstraint("id", name="pk_parent"),
    sa.UniqueConstraint("code", name="uq_parent_code"),
    sa.CheckConstraint("n >= 0 OR at IS NULL", name="ck_parent_n"),
)  # fmt: skip
child = sa.Table(
    "child", _schema,
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("parent_id", sa.String(32), nullable=True),
    sa.PrimaryKeyConstraint("seq"),
    sa.ForeignKeyConstraint(["parent_id"], ["parent.id"], name="fk_child_parent"),
)  # fmt: skip
NOW = datetime(2026, 1, 31, 2, 0, tzinfo=UTC)
ID = "0123456789abcdef" * 2


def _parent(**values: Any) -> dict[str, Any]:
    return {"id": ID, "n": 1, "code": None, "at": NOW, "digest": None} | values


def _first(rows: list[tuple[sa.Table, dict[str, Any]]]) -> str:
    """The first violation among ``rows``, as its message; "" if none."""
    with RowConstraints([parent, child]) as constraints:
        for table, row in rows:
            violation = constraints.check(table, row)
            if violation:
                return str(violation)
    return ""


@pytest.mark.parametrize(("row", "expected"), [
    (_parent(code="SYNTH"), "text longer than its column's declared length (code)"),
    (_parent(n=40000), "an integer outside its column's range (n)"),
    (_parent(code="a\x00b"), "a NUL character in text"),
    # Review 9i: PostgreSQL's btree refuses a bytea past 2,704 bytes in an index.
    (_parent(digest=b"12345"), "binary longer than its column's declared length (digest)"),
    # JSON can spell a lone surrogate; no database encodes it.
    (_parent(code="a\ud800"), "text with a lone surrogate, which no UTF-8 encodes (code)"),
    (_parent(n=-1), "values its CHECK constraint refuses (ck_parent_n)"),
])  # fmt: skip
def test_a_value_postgresql_refuses_is_named_by_column(row: dict[str, Any], expected: str) -> None:
    assert expected in _first([(parent, row)])
    assert f"(id={ID})" in _first([(parent, row)])


def test_sql_null_rules_hold() -> None:
    """A CHECK that is NULL passes; NULLs never conflict in a UNIQUE; a NULL reference
    references nothing (MATCH SIMPLE)."""
    rows = [
        (parent, _parent(n=-1, at=None)),
        (parent, _parent(id="1" * 32)),
        (child, {"seq": 1, "parent_id": None}),
        (child, {"seq": 2, "parent_id": ID}),
    ]
    assert _first(rows) == ""


@pytest.mark.parametrize(("rows", "expected"), [
    ([_parent(code="a"), _parent(id="1" * 32, code="a")], "another row holds too (uq_parent_code)"),
    ([_parent(), _parent()], "another row holds too (pk_parent)"),
])  # fmt: skip
def test_a_repeated_key_is_named_by_constraint(rows: list[dict[str, Any]], expected: str) -> None:
    assert expected in _first([(parent, row) for row in rows])


@pytest.mark.parametrize(("seqs", "expected"), [
    ([1, 1], "a key another row holds too (primary key (seq))"),
    ([2, 1], "a key out of its table's order (primary key (seq))"),
])  # fmt: skip
def test_an_integer_key_is_checked_by_order(seqs: list[int], expected: str) -> None:
    rows = [(parent, _parent())] + [(child, {"seq": s, "parent_id": ID}) for s in seqs]
    assert expected in _first(rows)


def test_a_reference_to_no_row_names_the_foreign_key() -> None:
    rows = [(parent, _parent()), (child, {"seq": 1, "parent_id": "f" * 32})]
    assert _first(rows) == (
        "a child row (seq=1) holds a reference to no parent row (fk_child_parent)"
    )


def test_a_child_before_its_parent_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="child references parent"):
        RowConstraints([child, parent])


def test_the_backed_up_tables_are_in_an_order_the_checks_accept() -> None:
    with RowConstraints(tables()):
        pass


@pytest.mark.parametrize(("key", "shown"), [
    ({"id": ID, "version": 3}, f"id={ID}, version=3"),
    ({"id": "SYNTH-NAME", "version": 3}, ""),  # a writer's key: anything, a name too
    ({"id": ID.upper(), "version": 3}, ""),
    ({"id": ID, "version": True}, ""),
])  # fmt: skip
def test_a_key_is_shown_only_in_the_forms_medvault_writes(key: dict[str, Any], shown: str) -> None:
    assert shown_key(["id", "version"], key) == shown


def _sqlite_refusal(message: str) -> sa.exc.IntegrityError:
    return sa.exc.IntegrityError("INSERT ...", {}, sqlite3.IntegrityError(message))


@pytest.mark.parametrize(("message", "expected"), [
    ("UNIQUE constraint failed: records.kind", "UNIQUE constraint refuses (records.kind)"),
    ("CHECK constraint failed: ck_x", "CHECK constraint refuses (ck_x)"),
    ("FOREIGN KEY constraint failed", "FOREIGN KEY constraint refuses"),
    # An unnamed CHECK's message is its expression, which may hold a literal: not kept.
    ("CHECK constraint failed: state <> 'SYNTH'", "a row it refuses (IntegrityError)"),
])  # fmt: skip
def test_a_sqlite_refusal_keeps_only_names(message: str, expected: str) -> None:
    text = load_refusal("records", _sqlite_refusal(message))
    assert text.startswith("the database refused a records row of the snapshot: ")
    assert expected in text
    assert "SYNTH" not in text
