"""Attack (cold review 9b): a database writer's trigger puts every rewrapped key back.

The rewrap counted a row as moved by its UPDATE's row count and started another pass
while rows were left and the pass had moved some. An AFTER UPDATE trigger that restores
the old version and wrapped key is not in that count: every pass "moved" the rows again,
each time one unwrap and one wrap in the token, and the job never ended. A pass now
starts only if fewer keys remain below the target than when the previous one began.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from service._gen.medvault.v1 import keys_pb2 as kpb
from storage.sql_metadata import make_engine
from tests.integration.keys.helpers import TIMEOUT, keys_stub, patient, records_stub, write

pytestmark = [pytest.mark.integration, pytest.mark.backend("sqlite")]

RECORDS = 16
_PUT_BACK = """
CREATE TRIGGER put_back AFTER UPDATE OF kek_version ON records
BEGIN
  UPDATE records SET kek_version = OLD.kek_version, wrapped_dek = OLD.wrapped_dek
  WHERE id = NEW.id AND version = NEW.version;
END
"""


def test_a_trigger_that_puts_keys_back_does_not_keep_the_rewrap_running(
    start_keys_server: Any, admin_cert: tuple[Path, Path], keys_database: str
) -> None:
    server = start_keys_server(bucket=f"mv-putback-{secrets.token_hex(5)}")
    records, who = records_stub(server), patient()
    for _ in range(RECORDS):
        write(records, who, 64)
    admin = keys_stub(server, admin_cert)
    admin.RotateKek(kpb.RotateKekRequest(), timeout=TIMEOUT)
    engine = make_engine(keys_database)
    try:
        with engine.begin() as c:
            c.exec_driver_sql(_PUT_BACK)
        seen = list(admin.Rewrap(kpb.RewrapRequest(batch_size=4), timeout=TIMEOUT))
    finally:
        with engine.begin() as c:
            c.execute(sa.text("DROP TRIGGER IF EXISTS put_back"))
        engine.dispose()
    # One pass over the keys (4 batches, a few progress messages), then the job ends with
    # every key still below the target: each key went through the token once.
    assert len(seen) < 20, f"{len(seen)} progress messages"
    last = seen[-1]
    assert last.rewrapped == RECORDS
    assert last.remaining == RECORDS
    # With the trigger gone, the same job moves them for good.
    again = list(admin.Rewrap(kpb.RewrapRequest(batch_size=4), timeout=TIMEOUT))
    assert again[-1].remaining == 0
