"""The commands: ``restore ID --into CONFIG [--force]`` and ``restore-drill ID``.

Run as the operator would, in a subprocess from config files (SQLite only: the code
paths below the CLI run on both backends in the other restore and drill tests).
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

from storage.backup.manifest import object_key
from storage.backup.targets import S3Target, read_all
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
    engine = sa.create_engine(url)
    assert count(engine, "records") == backup.counts["records"]

    again = _cli("restore", backup.backup_id, *flags)
    assert again.returncode == 1
    assert "not empty" in again.stderr
    assert "--force" in again.stderr

    forced = _cli("restore", backup.backup_id, *flags, "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert count(engine, "records") == backup.counts["records"]
    engine.dispose()


def test_drill_command_passes_then_fails_on_a_flipped_byte(
    sqlite_source: SignedSource, s3_target: S3Target, s3_server: Any, softhsm_token: Any,
    tmp_path: Path,
) -> None:  # fmt: skip
    source = sqlite_source.source
    backup = source.backup(s3_target)
    url = source.engine.url.render_as_string(hide_password=False)
    config = _config(tmp_path, "live", s3_server, softhsm_token, source.blobs.bucket, url,
                     sqlite_source.signer.ca_der)  # fmt: skip
    flags = ["--config", config, "--bucket", s3_target.describe().removeprefix("s3://")]

    good = _cli("restore-drill", backup.backup_id, *flags)
    assert good.returncode == 0, good.stdout[-2000:] + good.stderr[-2000:]
    assert "PASSED" in good.stdout
    assert "recovery time" in good.stdout
    assert count(source.engine, "audit_events WHERE action = 'backup.drill'") == 1

    victim = backup.manifest.objects[0]
    key = object_key(victim.sha256)
    data = bytearray(read_all(s3_target, key))
    data[-1] ^= 0x80
    s3_target.delete(key)
    s3_target.put(key, [bytes(data)])
    bad = _cli("restore-drill", backup.backup_id, *flags)
    assert bad.returncode == 1
    assert "FAILED" in bad.stdout
    assert victim.object_key in bad.stdout
    assert not drill_buckets(s3_server)
