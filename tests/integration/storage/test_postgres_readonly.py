"""A read-only PostgreSQL is an outage (BackendUnavailableError), never a generic error.

Each test gets its own database made read-only for new sessions with
``ALTER DATABASE ... SET default_transaction_read_only = on`` (what a hot standby
does); writes through the metadata store, the grant store, the backup ledger and the
audit log must each raise ``BackendUnavailableError`` saying the database is
read-only, naming the host but no row data. Reads still work.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore import Pkcs11BlindIndexer, Pkcs11SessionPool
from storage.audit_log import Pending, SqlAuditLog
from storage.audit_model import AuditEntry
from storage.backup.run_seal import RunSealer
from storage.backup.runs import SqlRunLedger
from storage.errors import BackendUnavailableError, RecordNotFoundError
from storage.grant_seal import GrantSealer
from storage.grants import SqlGrantStore
from storage.sql_metadata import SqlMetadataStore, make_engine, upgrade
from tests.fixtures.databases import PG_ADMIN_URL
from tests.integration.storage.test_sql_metadata import make_row

pytestmark = pytest.mark.integration
NOW = datetime(2024, 3, 1, 12, tzinfo=UTC)
PRINCIPAL = "dr-readonly-" + secrets.token_hex(4)


@pytest.fixture
def read_only_engine(postgres_admin: Engine) -> Iterator[Engine]:
    """An engine on a migrated database of this test, whose new sessions are read-only."""
    name = f"medvault_ro_{secrets.token_hex(6)}"
    with postgres_admin.connect() as c:  # a random hex name: nothing to inject
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine = make_engine(sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(False))
    try:
        upgrade(engine)
        engine.dispose()
        with postgres_admin.connect() as c:
            c.execute(sa.text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
        yield engine
    finally:
        engine.dispose()
        with postgres_admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _assert_read_only(error: pytest.ExceptionInfo[BackendUnavailableError]) -> None:
    message = str(error.value)
    assert "read-only" in message
    assert PRINCIPAL not in message


def test_metadata_writes_are_unavailable_reads_work(read_only_engine: Engine) -> None:
    store = SqlMetadataStore(read_only_engine)
    with pytest.raises(RecordNotFoundError):
        store.get(secrets.token_hex(16))
    row = make_row(created_by=PRINCIPAL)
    with pytest.raises(BackendUnavailableError) as error:
        store.insert(row)
    _assert_read_only(error)
    assert row.id not in str(error.value)
    with pytest.raises(BackendUnavailableError) as error:
        store.replace_sealed(row.id, 1, row.sealed_meta, b"new")
    _assert_read_only(error)


def test_grant_writes_are_unavailable(
    read_only_engine: Engine, keystore_pool: Pkcs11SessionPool
) -> None:
    grants = SqlGrantStore(read_only_engine, GrantSealer(Pkcs11BlindIndexer(keystore_pool)))
    assert grants.has_access(PRINCIPAL, bytes(32), NOW) is None
    with pytest.raises(BackendUnavailableError) as error:
        grants.grant(bytes(32), PRINCIPAL, "clerk-readonly", None, NOW)
    _assert_read_only(error)


def test_audit_append_is_unavailable(read_only_engine: Engine) -> None:
    entry = AuditEntry(
        time=NOW, principal=PRINCIPAL, application="", role="physician", action="records.read",
        resource="record/x", outcome="allowed", patient_index=None,
    )  # fmt: skip
    with pytest.raises(BackendUnavailableError) as error:
        SqlAuditLog(read_only_engine).append_pending([Pending(entry)])
    assert PRINCIPAL not in str(error.value)


def test_backup_ledger_write_is_unavailable(
    read_only_engine: Engine, keystore_pool: Pkcs11SessionPool
) -> None:
    ledger = SqlRunLedger(read_only_engine, RunSealer(Pkcs11BlindIndexer(keystore_pool)))
    with pytest.raises(BackendUnavailableError):
        ledger.claim(NOW, "backup", "replica-1", NOW)
