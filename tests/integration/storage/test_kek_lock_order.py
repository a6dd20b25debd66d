"""A put's check of its KEK version and a rotation's state change never deadlock
(PostgreSQL; session 9's CI run: ``deadlock detected`` between an audit batch's
``SELECT ... FOR SHARE`` of both versions and the rotation's ``_mark_active``).

A batch of puts may check the new version, then the old one; the rotation updates the
old one, then the new one. With the key-share lock a put takes now, neither waits for
the other, while a retirement (FOR UPDATE) still waits for every put of its version.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from storage.kek import _mark_active, _mark_retired
from storage.sql_metadata import kek_state, kek_versions
from tests.integration.storage.test_audit_log import (  # noqa: F401 - fixtures
    audit_engine,
    audit_url,
)

pytestmark = [pytest.mark.integration, pytest.mark.backend("postgresql")]
# ruff: noqa: F811  (the fixtures imported above are the parameters)


def _versions(engine: Engine) -> None:
    now = datetime.now(UTC)
    with engine.begin() as c:
        c.execute(kek_versions.insert(), [
            {"version": 1, "state": "active", "created_at": now},
            {"version": 2, "state": "previous", "created_at": now},
        ])  # fmt: skip


def test_a_rotation_does_not_wait_for_puts_checking_both_versions(audit_engine: Engine) -> None:
    _versions(audit_engine)
    with audit_engine.connect() as batch, audit_engine.connect() as rotation:
        batch.begin()
        assert kek_state(batch, 2) == "previous"  # a put wrapped with the new version
        rotation.begin()
        rotation.exec_driver_sql("SET LOCAL lock_timeout = '3s'")  # a wait fails the test
        _mark_active(rotation, 2)  # old to previous, new to active: no wait on the batch
        rotation.commit()
        assert kek_state(batch, 1) == "previous"  # a put of the old version: no wait either
        batch.commit()


def test_a_retirement_still_waits_for_a_put_of_its_version(audit_engine: Engine) -> None:
    _versions(audit_engine)
    with audit_engine.connect() as put, audit_engine.connect() as retire:
        put.begin()
        assert kek_state(put, 2) == "previous"
        retire.begin()
        retire.exec_driver_sql("SET LOCAL lock_timeout = '1s'")
        with pytest.raises(sa.exc.OperationalError, match="lock timeout"):
            _mark_retired(retire, 2)  # blocked by the put's lock until it ends
        retire.rollback()
        put.rollback()
