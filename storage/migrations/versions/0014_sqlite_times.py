"""SQLite: the times migration 0005 wrote in SQLite's own form, in the form medvault writes.

``kek_versions.created_at`` of the versions registered by 0005 was filled by
``CURRENT_TIMESTAMP``: ``YYYY-MM-DD HH:MM:SS``, no fraction. Stored times are read only
in the exact form SQLAlchemy's SQLite ``DATETIME`` writes (``storage.sqlite_text``,
``YYYY-MM-DD HH:MM:SS.ffffff``), so such a value would read as the 1970 placeholder; it
gets its ``.000000``. Nothing else medvault wrote needs it; PostgreSQL stores timestamps.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | None = None
depends_on: str | None = None

# 0005's form, as a GLOB pattern: YYYY-MM-DD HH:MM:SS.
_SECONDS = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9] [0-9][0-9]:[0-9][0-9]:[0-9][0-9]"


def upgrade() -> None:
    """Give 0005's times their microseconds (SQLite only)."""
    if op.get_bind().dialect.name != "sqlite":
        return
    # Plain SQL, no user input; only text of exactly 0005's form is changed.
    op.execute(
        sa.text(
            "UPDATE kek_versions SET created_at = created_at || '.000000' "
            "WHERE typeof(created_at) = 'text' AND created_at GLOB :seconds"
        ).bindparams(seconds=_SECONDS)
    )


def downgrade() -> None:
    """Nothing to undo: the new text is the same instant, in the form 0013 reads too."""
