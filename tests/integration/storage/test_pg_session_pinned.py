"""Attack (cold review 9, F2): a database writer sets session defaults on PostgreSQL.

``ALTER DATABASE ... SET`` (or ``ALTER ROLE ... SET``) changes how every new session of
the service renders what it reads: under a DateStyle other than ISO psycopg refuses to
load any timestamp (``NotImplementedError``, whose message quotes the stored time, into
a logged traceback), and under ``client_encoding SQL_ASCII`` it returns text as bytes,
so every audit row would read as altered. ``make_engine`` pins the settings the reads
depend on in the connection's startup packet (``sql_engine.PINNED_SESSION``), which
override such defaults, while the operator's own ``options`` in the URL still apply.
"""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore.signing import Pkcs11Signer
from storage.audit_log import SqlAuditLog
from storage.audit_model import AuditFilter
from storage.sql_metadata import make_engine, pinned_session_options
from tests.integration.storage.test_audit_log import (  # noqa: F401 - fixtures
    audit_engine,
    audit_log,
    audit_url,
    chain,
    signer,
    verify,
)

pytestmark = [pytest.mark.integration, pytest.mark.backend("postgresql")]
# ruff: noqa: F811  (the fixtures imported above are the parameters)

WRITER_DEFAULTS = {
    "DateStyle SQL": "SET DateStyle = 'SQL, DMY'",
    "DateStyle German": "SET DateStyle = 'German'",
    "client_encoding SQL_ASCII": "SET client_encoding = 'SQL_ASCII'",
    "TimeZone far east": "SET TimeZone = 'Pacific/Kiritimati'",
    "IntervalStyle iso_8601": "SET IntervalStyle = 'iso_8601'",
}


def _database_set(engine: Engine, setting: str) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.exec_driver_sql(f'ALTER DATABASE "{engine.url.database}" {setting}')
    engine.dispose()  # later sessions start with the writer's default


@pytest.mark.parametrize("kind", sorted(WRITER_DEFAULTS))
def test_a_session_default_set_by_a_writer_does_not_change_audit_reads(
    audit_engine: Engine, chain: SqlAuditLog, signer: Pkcs11Signer, kind: str
) -> None:
    _database_set(audit_engine, WRITER_DEFAULTS[kind])
    # A writer's default does reach a session that does not pin (what the attack needs).
    url = audit_engine.url
    with psycopg.connect(host=url.host, port=url.port, user=url.username,
                         dbname=url.database, autocommit=True) as plain:  # fmt: skip
        shown = {
            name: plain.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
            for name in ("DateStyle", "client_encoding", "TimeZone", "IntervalStyle")
        }
    assert shown != {"DateStyle": "ISO, MDY", "client_encoding": "UTF8", "TimeZone": "UTC",
                     "IntervalStyle": "postgres"}, "the writer's default did not apply"  # fmt: skip
    # The service's own engine: every row reads as written, the chain verifies.
    assert verify(chain, signer) == (None, "chain intact")
    listed = list(chain.query(AuditFilter()))
    assert len(listed) == 60
    assert not [e for e in listed if e.malformed]
    with audit_engine.connect() as c:
        assert c.exec_driver_sql("SHOW DateStyle").scalar().startswith("ISO")
        assert c.exec_driver_sql("SHOW client_encoding").scalar() == "UTF8"
        assert c.exec_driver_sql("SHOW TimeZone").scalar() == "UTC"
        assert c.exec_driver_sql("SHOW IntervalStyle").scalar() == "postgres"


def test_the_operators_options_in_the_url_still_apply(audit_url: str) -> None:
    """The URL is configuration: its ``options`` follow the pinned ones (and so win)."""
    url = sa.make_url(audit_url).update_query_dict(
        {"options": "-c application_name=mv-ops -c statement_timeout=12345"}
    )
    engine = make_engine(url.render_as_string(hide_password=False))
    try:
        with engine.connect() as c:
            assert c.exec_driver_sql("SHOW application_name").scalar() == "mv-ops"
            assert c.exec_driver_sql("SHOW statement_timeout").scalar() == "12345ms"
            assert c.exec_driver_sql("SHOW client_encoding").scalar() == "UTF8"
    finally:
        engine.dispose()


def test_pinned_options_put_the_operators_last() -> None:
    assert pinned_session_options() == (
        "-c DateStyle=ISO -c IntervalStyle=postgres -c client_encoding=UTF8 -c TimeZone=UTC"
    )
    assert pinned_session_options("-c TimeZone=Asia/Ho_Chi_Minh").endswith(
        "-c TimeZone=UTC -c TimeZone=Asia/Ho_Chi_Minh"
    )
