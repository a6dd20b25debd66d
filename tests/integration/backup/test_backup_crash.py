"""SIGKILL ``medvault backup run`` midway: never complete; the next run finishes the work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from storage.backup.manifest import MANIFESTS_PREFIX, OBJECTS_PREFIX, SNAPSHOTS_PREFIX
from storage.backup.retention import list_backups
from storage.backup.targets import S3Target
from tests.integration.backup.helpers import ROOT, run_cli

# Ten times the 20 copied objects the kill waits for: the run cannot finish in between.
RECORDS = 200


def _config(path: Path, source: Any, s3_server: Any, token: Any) -> Path:
    path.write_text(f"""
[tls]
enabled = false
[s3]
endpoint = "{s3_server.endpoint}"
bucket = "{source.blobs.bucket}"
access_key_file = "{s3_server.access_key_file}"
secret_key_file = "{s3_server.secret_key_file}"
[database]
url = "{source.engine.url.render_as_string(hide_password=False)}"
[keystore]
module = "{token.module_path}"
token_label = "{token.token_label}"
pin_file = "{token.pin_file}"
softhsm2_conf = "{token.conf_path}"
""")
    return path


def test_killed_run_is_never_complete(
    make_source: Any, s3_server: Any, softhsm_token: Any, s3_target: S3Target, tmp_path: Path
) -> None:
    source = make_source("sqlite")
    source.add_records(RECORDS, size=20_000)
    config = _config(tmp_path / "config.toml", source, s3_server, softhsm_token)
    bucket = s3_target.describe().removeprefix("s3://")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "backup",
            "run",
            "--config",
            str(config),
            "--bucket",
            bucket,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if len(list(s3_target.list(OBJECTS_PREFIX))) >= 20:
                break
            time.sleep(0.01)
        assert process.poll() is None, "the run finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    copied_before = len(list(s3_target.list(OBJECTS_PREFIX)))
    assert 20 <= copied_before < RECORDS
    assert list(s3_target.list(MANIFESTS_PREFIX)) == []  # never complete
    assert list_backups(s3_target) == []
    assert len(list(s3_target.list(SNAPSHOTS_PREFIX))) == 1  # the snapshot went first

    done = run_cli(config, "run", "--bucket", bucket)
    assert done.returncode == 0, done.stderr
    [backup] = list_backups(s3_target)
    assert backup.records == RECORDS
    assert backup.copied_objects == RECORDS - copied_before
    verify = run_cli(config, "verify", backup.id, "--read-data", "--bucket", bucket)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "OK" in verify.stdout
    listing = run_cli(config, "list", "--bucket", bucket)
    assert backup.id in listing.stdout

    s3_target.delete(next(iter(s3_target.list(OBJECTS_PREFIX))))
    failed = run_cli(config, "verify", backup.id, "--bucket", bucket)
    assert failed.returncode == 1
    assert "missing" in failed.stdout
