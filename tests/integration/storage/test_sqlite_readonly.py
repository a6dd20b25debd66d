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
import sqlalchemy as sa

from storage.sql_metadata import make_engine
from storage.sqlite_guard import UnwritableDatabaseError, unwritable
from tests.fixtures.service import ROOT

pytestmark = pytest.mark.integration

IMMUTABLE = os.geteuid() == 0 and shutil.which("chattr") is not None

CHILD = r"""
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
"""


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


def _lock(path: Path, on: bool) -> None:
    if IMMUTABLE:
        subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)
    else:
        path.chmod((0o555 if path.is_dir() else 0o444) if on else 0o755)


def test_symlinked_files_are_judged_by_their_target(tmp_path: Path) -> None:
    """A -wal that is a dangling link, or a link to an unwritable file, is refused."""
    db = tmp_path / "db" / "metadata.db"
    db.parent.mkdir()
    db.write_bytes(b"")
    assert unwritable(db) is None
    wal = db.with_name("metadata.db-wal")
    wal.symlink_to(tmp_path / "nowhere")
    assert unwritable(db) == "metadata.db-wal is read-only or immutable"
    wal.unlink()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    wal.symlink_to(target)
    assert unwritable(db) is None
    _lock(target, True)
    try:
        assert unwritable(db) == "metadata.db-wal is read-only or immutable"
    finally:
        _lock(target, False)


def test_directory_replaced_under_a_running_engine_is_refused(tmp_path: Path) -> None:
    """The paths are fixed when the engine is made: a read-only directory put in their place
    is checked, not the renamed one the open connections still write to."""
    db = tmp_path / "db" / "metadata.db"
    db.parent.mkdir()
    engine = make_engine(f"sqlite:///{db}")
    try:
        with engine.begin() as c:
            c.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        db.parent.rename(tmp_path / "moved")
        db.parent.mkdir()
        _lock(db.parent, True)
        try:
            with pytest.raises(sa.exc.OperationalError) as refused, engine.begin() as c:
                c.exec_driver_sql("INSERT INTO t VALUES (1)")
            assert isinstance(refused.value.orig, UnwritableDatabaseError)
            assert str(refused.value.orig) == "directory of metadata.db is read-only"
        finally:
            _lock(db.parent, False)
    finally:
        engine.dispose()
