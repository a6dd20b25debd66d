"""Grant rows authenticated and their free text sealed (storage.grant_seal).

Adds ``mac``, ``sealed_reason`` and ``sealed_comment`` to ``access_grants``. Rows that
exist already are adopted in this migration's transaction when the service runs it (it
passes ``storage.grants.GRANT_ADOPTER`` holding the token): their reason and comment are
sealed, the clear columns emptied, and a MAC written. Run without the token (a bare
``alembic upgrade``), the rows stay as they were: they then grant nothing, and the
review queue shows their clear text marked as a legacy row (docs/security.md).

Revision ID: 0009
Revises: 0006
Create Date: 2026-12-10
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import sqlalchemy as sa
from alembic import context, op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | None = None
depends_on: str | None = None

# Mirrors storage.grants.GRANT_ADOPTER (a migration imports no application module).
_ADOPTER = "medvault.grant_adopter"
log = logging.getLogger(__name__)


def upgrade() -> None:
    """Add the MAC and sealed columns; adopt the existing rows when the token is here."""
    with op.batch_alter_table("access_grants") as batch:
        batch.add_column(sa.Column("mac", sa.LargeBinary(32), nullable=True))
        batch.add_column(sa.Column("sealed_reason", sa.LargeBinary, nullable=True))
        batch.add_column(sa.Column("sealed_comment", sa.LargeBinary, nullable=True))
    adopter: Callable[[sa.Connection], int] | None = context.config.attributes.get(_ADOPTER)
    if adopter is not None:
        adopted = adopter(op.get_bind())
        log.info("grant rows adopted", extra={"grants": adopted})
    else:
        log.warning("migration 0009 ran without the token: existing grant rows are not adopted")


def downgrade() -> None:
    """Drop the columns (sealed text is lost: re-adoption needs the clear text)."""
    with op.batch_alter_table("access_grants") as batch:
        batch.drop_column("sealed_comment")
        batch.drop_column("sealed_reason")
        batch.drop_column("mac")
