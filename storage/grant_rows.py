"""The ``access_grants`` table, the forms of its fields, and its rows read strictly.

Nothing here verifies a row: ``storage.grant_reads`` checks each row's MAC
(``storage.grant_seal``) before it grants anything. The checks below run before a
grant is stored or looked up, so an error names the field, never a stored value.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Row

from storage.errors import InvalidRecordError
from storage.grants_model import Grant
from storage.row_values import RowValues
from storage.sql_schema import metadata
from storage.sqlite_text import StoredTime
from storage.validation import check_printable

MAX_PRINCIPAL_LENGTH = 128
MAX_TEXT_LENGTH = 1000  # reason and review comment
PATIENT_INDEX_LENGTH = 32  # HMAC-SHA256
_GRANT_ID = re.compile(r"^[0-9a-f]{32}\Z")


# The schema as queries see it; storage/migrations/versions/0003_grants.py made it.
# On the shared ``metadata`` so that Alembic compares one schema with the database.
access_grants = sa.Table(
    "access_grants",
    metadata,
    sa.Column("id", sa.String(32), nullable=False),
    sa.Column("patient_index", sa.LargeBinary(32), nullable=False),
    sa.Column("principal", sa.String(255), nullable=False),
    sa.Column("granted_by", sa.String(255), nullable=False),
    sa.Column("created_at", StoredTime(), nullable=False),
    sa.Column("expires_at", StoredTime(), nullable=True),
    sa.Column("revoked_at", StoredTime(), nullable=True),
    sa.Column("revoked_by", sa.String(255), nullable=True),
    sa.Column("break_glass", sa.Boolean, nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("reviewed_at", StoredTime(), nullable=True),
    sa.Column("reviewed_by", sa.String(255), nullable=True),
    sa.Column("review_comment", sa.Text, nullable=True),
    sa.Column("mac", sa.LargeBinary(32), nullable=True),
    sa.Column("sealed_reason", sa.LargeBinary, nullable=True),
    sa.Column("sealed_comment", sa.LargeBinary, nullable=True),
    sa.PrimaryKeyConstraint("id", name="pk_access_grants"),
    sa.CheckConstraint(
        "NOT break_glass OR (reason IS NOT NULL AND expires_at IS NOT NULL)",
        name="ck_access_grants_break_glass",
    ),
    sa.Index("ix_access_grants_principal_patient", "principal", "patient_index"),
    sa.Index("ix_access_grants_patient", "patient_index"),
    sa.Index("ix_access_grants_break_glass_reviewed", "break_glass", "reviewed_at"),
)


def check_actor(field: str, value: str) -> None:
    """A person id or application CN: required, bounded, no control characters."""
    check_printable(field, value, MAX_PRINCIPAL_LENGTH, required=True)


def check_text(field: str, value: str) -> None:
    """Free text (reason, comment): required and bounded.

    Control characters are refused as well: the text is shown in the security
    officer's terminal tables and exports, where they could forge lines or escapes.
    """
    check_printable(field, value, MAX_TEXT_LENGTH, required=True)


def check_patient(patient_index: bytes) -> None:
    """``InvalidRecordError`` unless ``patient_index`` has a blind index's length."""
    if len(patient_index) != PATIENT_INDEX_LENGTH:
        raise InvalidRecordError("patient_index", f"must be {PATIENT_INDEX_LENGTH} bytes")


def is_grant_id(value: str) -> bool:
    """Whether ``value`` has the form of a grant id."""
    return _GRANT_ID.match(value) is not None


def check_grant_id(grant_id: str) -> None:
    """``InvalidRecordError`` unless ``grant_id`` has the form of a grant id."""
    if not is_grant_id(grant_id):
        raise InvalidRecordError("grant_id", "is not a grant id (32 lowercase hex digits)")


# The columns the MAC covers (``storage.grant_seal.canonical``), and the MAC: one of
# them holding a value of a type medvault never stores makes the row forged. The others
# read as placeholders that fail where they are checked: a review by "" at the epoch
# does not open, a revocation at the epoch has taken effect.
_AUTHENTICATED = frozenset({
    "id", "patient_index", "principal", "granted_by", "created_at", "expires_at",
    "break_glass", "sealed_reason", "mac",
})  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class GrantRow:
    """A row read strictly (``storage.row_values``): the grant it says, its sealed text
    and MAC, its clear text (legacy rows), and the columns that held a value of a type
    medvault never stores."""

    grant: Grant
    sealed_reason: bytes | None
    sealed_comment: bytes | None
    mac: bytes | None
    reason: str | None  # clear text of a legacy row only
    review_comment: str | None
    malformed: tuple[str, ...]

    @property
    def forged(self) -> bool:
        """An authenticated column is malformed: the row grants nothing, whatever its MAC."""
        return not _AUTHENTICATED.isdisjoint(self.malformed)


def read_grant_row(row: Row[Any] | Mapping[str, Any]) -> GrantRow:
    """``row`` (a result row, or a backup snapshot's row by column name) as a
    :class:`GrantRow` (nothing verified)."""
    v = RowValues(row._mapping if isinstance(row, Row) else row)
    grant = Grant(
        id=v.text("id"),
        patient_index=v.binary("patient_index"),
        principal=v.text("principal"),
        granted_by=v.text("granted_by"),
        created_at=v.time("created_at"),
        expires_at=v.optional_time("expires_at"),
        revoked_at=v.optional_time("revoked_at"),
        revoked_by=v.optional_text("revoked_by"),
        break_glass=v.boolean("break_glass"),
        reason=None,  # opened only for the review queue
        reviewed_at=v.optional_time("reviewed_at"),
        reviewed_by=v.optional_text("reviewed_by"),
        review_comment=None,
    )
    return GrantRow(
        grant, v.optional_binary("sealed_reason"), v.optional_binary("sealed_comment"),
        v.optional_binary("mac"), v.optional_text("reason"), v.optional_text("review_comment"),
        tuple(v.malformed),
    )  # fmt: skip


def row_to_grant(row: Row[Any]) -> Grant:
    """The grant a row says (not verified: ``SqlGrantStore`` checks its MAC and types)."""
    return read_grant_row(row).grant
