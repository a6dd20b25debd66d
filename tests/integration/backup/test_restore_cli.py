"""The local command ``restore ID --into CONFIG [--force]``.

Run as the operator would, in a subprocess from config files (SQLite only: the code
paths below the CLI run on both backends in the other restore tests). ``restore-drill``
is a service call: tests/integration/backup/test_operator_cli.py.
"""

# Fixtures come from restore_fixtures (the backup conftest is another module's): pytest
# finds them by the imported name, which ruff reads as a redefinition.
# ruff: noqa: F811

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from storage.backup.targets import S3Target
from tests.integration.backup.helpers import ROOT
from tests.integration.backup.restore_fixtures import (  # noqa: F401  (fixtures)
    SignedSource,
    config_file,
    count,
    doc_signer,
    drill_buckets,
    populate,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


@pytest.fixture
def sqlite_source(make_source: Any, doc_signer: Any) -> SignedSource:
    return populate(make_source("sqlite"), doc_signer)


def _config(tmp_path: Path, name: str, s3_server: Any, token: Any, bucket: str, url: str,
            anchor: bytes = b"") -> str:  # fmt: skip
    return str(config_file(tmp_path / name, s3_server=s3_server, token=token, bucket=bucket,
                           database_url=url, trust_anchor_der=anchor))  # fmt: skip


def test_restore_command_refuses_non_empty_target_without_force(
    sqlite_source: SignedSource, s3_target: S3Target, s3_server: Any, softhsm_token: Any,
    tmp_path: Path,
) -> None:  # fmt: skip
    source = sqlite_source.source
    backup = source.backup(s3_target)
    bucket = f"rc-{secrets.token_hex(6)}"
    url = f"sqlite:///{tmp_path / 'restored.db'}"
    into = _config(tmp_path, "into", s3_server, softhsm_token, bucket, url)
    flags = [
        "--into",
        into,
        "--config",
        into,
        "--bucket",
        s3_target.describe().removeprefix("s3://"),
    ]

    first = _cli("restore", backup.backup_id, *flags)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "Running upgrade" not in first.stdout + first.stderr  # no alembic lines
    engine = sa.create_engine(url)
    assert count(engine, "records") == backup.counts["records"]
    # The restore wrote its own event into the deployment it filled, as the console user.
    restored = (f"audit_events WHERE action = 'backup.restore' AND principal LIKE 'console%' "
                f"AND resource = 'backup/{backup.backup_id}'")
    assert count(engine, restored) == 1

    again = _cli("restore", backup.backup_id, *flags)
    assert again.returncode == 1
    assert "not empty" in again.stderr
    assert "--force" in again.stderr

    forced = _cli("restore", backup.backup_id, *flags, "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert count(engine, "records") == backup.counts["records"]
    assert count(engine, restored) == 1  # the snapshot replaced the first one's
    help_text = " ".join(_cli("restore", "--help").stdout.split())
    assert "Runs locally" in help_text
    engine.dispose()
