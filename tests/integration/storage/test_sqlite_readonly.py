"""A read-only or immutable SQLite database gives UNAVAILABLE, never a crash (issue 8, 5).

Making the WAL index (``-shm``) immutable while the process has it mapped used to kill
the process with SIGBUS at its next transaction. The scenario runs in a child process,
so that a crash shows as its exit status instead of taking pytest down. As root the
files are made immutable (``chattr +i``, which ``os.access`` reports even for root);
without root, ``chmod 0444`` exercises the same refusal (no crash to provoke then:
permissions are checked when a file is opened, not on a mapping).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.service import ROOT

pytestmark = pytest.mark.integration

IMMUTABLE = os.geteuid() == 0 and shutil.which("chattr") is not None

CHILD = r'''
import os, subprocess, sys
from datetime import UTC, datetime
from pathlib import Path
from storage.audit_log import SqlAuditLog
from storage.audit_model import AuditEntry
from storage.errors import BackendUnavailableError
from storage.sql_metadata import make_engine, upgrade

db, target, immutable = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
engine = make_engine(f"sqlite:///{db}")
upgrade(engine)
log = SqlAuditLog(engine)
entry = AuditEntry(time=datetime.now(UTC), principal="p", action="a", resource="r",
                   outcome="allowed")
log.append([entry])  # connections open, -shm mapped
path = db.with_name(db.name + target) if target != "dir" else db.parent

def lock(on):
    if immutable:
        subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)
    else:
        os.chmod(path, (0o555 if target == "dir" else 0o444) if on else 0o755)

lock(True)
try:
    for attempt in (lambda: log.append([entry]), log.head, log.last_checkpoint):
        try:
            attempt()
            print("NOT REFUSED")
        except BackendUnavailableError as e:
            print("refused:", "not writable" in str(e) or "Unwritable" in str(e))
finally:
    lock(False)
log.append([entry])
print("recovered", log.head()[0])
engine.dispose()
'''


@pytest.mark.parametrize("target", ["-shm", "-wal", "", "dir"])
def test_unwritable_database_is_refused_not_fatal(tmp_path: Path, target: str) -> None:
    db = tmp_path / "db" / "metadata.db"
    db.parent.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(db), target, "1" if IMMUTABLE else "0"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, f"child died ({result.returncode}): {result.stderr[-800:]}"
    lines = result.stdout.splitlines()
    assert lines[:3] == ["refused: True"] * 3, lines
    assert lines[3] == "recovered 2", lines


def test_server_refuses_to_start_on_an_immutable_database(tmp_path: Path) -> None:
    """Start-up on an unwritable file exits with a message naming the problem."""
    db = tmp_path / "metadata.db"
    db.write_bytes(b"")
    if IMMUTABLE:
        subprocess.run(["chattr", "+i", str(db)], check=True)
    else:
        db.chmod(0o444)
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{db}"\n')
    try:
        code = (  # what ``medvault serve`` does first
            "import sys; from storage.sql_metadata import make_engine, upgrade\n"
            "from storage.errors import StorageError\n"
            f"engine = make_engine('sqlite:///{db}')\n"
            "try:\n    upgrade(engine)\nexcept StorageError as e:\n    print(e); sys.exit(1)\n"
        )  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True,
            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    finally:
        if IMMUTABLE:
            subprocess.run(["chattr", "-i", str(db)], check=True)
    assert result.returncode == 1, result.stderr[-800:]
    assert "metadata.db is read-only or immutable" in result.stdout
