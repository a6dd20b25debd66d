"""Upgrade legacy (v1) sealed metadata to v2, so every trusted column is authenticated.

A v1 row sealed only the patient, title and plaintext digest. The upgrade, per row:
verifies it like every read (key, seal, the patient against its recomputed blind
index), decrypts the whole object (every segment authenticated) and checks what the
content proves: plaintext size and SHA-256 against the row and the sealed digest,
stored size and ciphertext SHA-256 against the row. It then seals the row's columns as
they are (v2) and replaces ``sealed_meta`` only if it is still the blob it verified.

What the content cannot prove (kind, content type, created_by, created_at) is sealed
as the row says at upgrade time: edits made before the upgrade are not detected
(docs/encryption.md, "Legacy rows"). It runs as the last phase of ``medvault keys
rewrap`` (``storage.kek``), resumable like it: the rows are the state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from storage.errors import StorageError
from storage.pg_loads import lenient_loads
from storage.row_values import RowValues
from storage.sealing import META_V2
from storage.sql_metadata import records, translated
from storage.sqlite_text import bindable, text_as_read

# (record id, version) -> True if resealed now, False if it was v2 already.
Upgrade = Callable[[str, int], bool]


def legacy_condition() -> sa.ColumnElement[bool]:
    """Rows sealed in v1: their blob starts with 0x01 (v2 blobs start with 0x02)."""
    return records.c.sealed_meta < META_V2


def count_legacy(engine: Engine) -> int:
    """Rows still sealed in v1."""
    query = sa.select(sa.func.count()).select_from(records).where(legacy_condition())
    with translated(engine), engine.connect() as connection:
        return int(connection.scalar(query) or 0)


@dataclass
class LegacyResealer:
    """Walks the v1 rows in (id, version) order, one batch per ``step``."""

    engine: Engine
    upgrade: Upgrade
    resealed: int = 0
    failed: set[tuple[object, object]] = field(default_factory=set)
    finished: bool = False
    _after: tuple[object, object] | None = None  # the id as stored (``sqlite_text.bindable``)

    def step(self, batch_size: int) -> None:
        """Upgrade one batch; ``finished`` once no v1 row is left after the position."""
        query = sa.select(records.c.id, records.c.version).where(legacy_condition())
        if self._after is not None:
            key = sa.tuple_(records.c.id, records.c.version)
            query = query.where(key > sa.tuple_(*self._after))
        query = query.order_by(records.c.id, records.c.version).limit(batch_size)
        # Ids as stored: the next batch starts past the last, whatever its bytes (an id
        # that is not UTF-8, read replaced and bound back, would start it there again);
        # a value psycopg cannot load reads as a malformed one (storage.pg_loads).
        with (
            translated(self.engine),
            self.engine.connect() as connection,
            text_as_read(connection),
            lenient_loads(connection),
        ):
            rows = [r._mapping for r in connection.execute(query)]
        if not rows:
            self.finished = True
            return
        self._after = (bindable(rows[-1]["id"]), rows[-1]["version"])
        for row in rows:
            # Text that is not UTF-8, or a version of another type (storage.row_values):
            # not the service's row.
            v = RowValues(row)
            record_id, version = v.text("id"), v.version("version")
            if v.malformed:
                self.failed.add((row["id"], row["version"]))
                continue
            try:
                self.resealed += int(self.upgrade(record_id, version))
            except StorageError:  # tampered or unreadable: reported, left as it is
                self.failed.add((record_id, version))
