"""The ``medvault`` CLI (put, ls, get, stat) as subprocesses against the shared server.

PYTEST_DONT_REWRITE: a failed assertion shows no values, since they could look like
patient data; the helpers in calls.py name what differs instead.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from storage.audit_log import SqlAuditLog
from tests.fixtures.service import ROOT, RunningService
from tests.integration.service.calls import expect_same_content
from tests.integration.service.streams import AUTHORITY, data, new_patient, pdf

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _cli(service: RunningService, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT, env=service.cli_env(), capture_output=True, text=True, timeout=60,
        check=False,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    # stderr is the CLI's own error line (it carries no patient data by design).
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-500:]}"
    return result.stdout


def test_put_ls_get_stat_round_trip(medvault_service: RunningService, tmp_path: Path) -> None:
    patient = new_patient().id
    source = tmp_path / "report.pdf"
    source.write_bytes(pdf(filler=data(3 << 20, seed=5)))  # a few segments and CLI chunks

    out = _ok(_cli(medvault_service, "put", str(source), "--patient", patient,
                   "--authority", AUTHORITY, "--kind", "PDF", "--title", "cli report"))
    match = re.fullmatch(r"stored ([0-9a-f]{32}) version 1 \((\d+) bytes\)\n", out)
    assert match, "unexpected put output"
    record_id = match.group(1)
    assert int(match.group(2)) == source.stat().st_size, "put reports another size"

    listed = _ok(_cli(medvault_service, "ls", "--patient", patient, "--authority", AUTHORITY))
    lines = listed.splitlines()
    assert len(lines) == 1, f"{len(lines)} lines listed"
    assert lines[0].startswith(f"{record_id}  v1  PDF"), "ls line does not name the record"
    assert str(source.stat().st_size) in lines[0], "ls line lacks the size"

    target = tmp_path / "out" / "copy.pdf"
    target.parent.mkdir()
    _ok(_cli(medvault_service, "get", record_id, "-o", str(target)))
    expect_same_content(target.read_bytes(), source.read_bytes())
    assert not list(target.parent.glob("*.partial")), "a partial file was left"

    stat = _ok(_cli(medvault_service, "stat", record_id))
    assert f"id:           {record_id}" in stat, "stat lacks the id"
    assert "version:      1" in stat, "stat lacks the version"
    assert f"size:         {source.stat().st_size}" in stat, "stat lacks the size"
    assert "by test-app" in stat, "stat lacks the creator"

    # An amendment, then ls --all-versions and get of each version.
    amended = tmp_path / "amended.pdf"
    amended.write_bytes(pdf())
    out = _ok(_cli(medvault_service, "put", str(amended), "--patient", patient,
                   "--authority", AUTHORITY, "--kind", "PDF", "--supersedes", record_id))
    assert out.startswith(f"stored {record_id} version 2 "), "amendment is not version 2"
    every = _ok(_cli(medvault_service, "ls", "--patient", patient, "--authority", AUTHORITY,
                     "--all-versions")).splitlines()
    assert [line[:36] for line in every] == [f"{record_id}  v2", f"{record_id}  v1"], (
        "ls --all-versions lists other rows")
    _ok(_cli(medvault_service, "get", record_id, "--version", "1", "-o", str(target)))
    expect_same_content(target.read_bytes(), source.read_bytes())
    _ok(_cli(medvault_service, "get", record_id, "-o", str(target)))
    expect_same_content(target.read_bytes(), amended.read_bytes())


@pytest.mark.parametrize("command", ["get", "stat"])
def test_unknown_id_fails_with_one_line(
    medvault_service: RunningService, tmp_path: Path, command: str
) -> None:
    target = tmp_path / "never.bin"
    args = [command, secrets.token_hex(16)] + (["-o", str(target)] if command == "get" else [])
    result = _cli(medvault_service, *args)
    assert result.returncode != 0, "an unknown id succeeded"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"{len(lines)} error lines"
    assert lines[0].startswith("medvault: NOT_FOUND: "), "the error line names no status"
    assert "Traceback" not in result.stderr, "a traceback was printed"
    assert result.stdout == "", "output on failure"
    assert not target.exists(), "an output file was left"
    assert not list(tmp_path.glob("*.partial")), "a partial file was left"


def test_malformed_id_fails_with_one_line(medvault_service: RunningService) -> None:
    result = _cli(medvault_service, "stat", "not-an-id")
    assert result.returncode != 0, "a malformed id succeeded"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"{len(lines)} error lines"
    assert lines[0].startswith("medvault: INVALID_ARGUMENT: id"), "the error line is unclear"


def _reads_of(database_url: str, record_id: str, after_sequence: int) -> int:
    """Allowed reads of ``record_id`` audited after ``after_sequence``."""
    engine = sa.create_engine(database_url)
    try:
        events = SqlAuditLog(engine).events(after_sequence, limit=100_000)
    finally:
        engine.dispose()
    return sum(1 for e in events if e.entry.action == "records.read"
               and e.entry.resource.startswith(f"record/{record_id}")
               and e.entry.outcome == "allowed")  # fmt: skip


def test_get_into_a_path_that_cannot_be_written_fails_before_the_read(
    medvault_service: RunningService, database_url: str, tmp_path: Path
) -> None:
    source = tmp_path / "note.pdf"
    source.write_bytes(pdf())
    out = _ok(_cli(medvault_service, "put", str(source), "--patient", new_patient().id,
                   "--authority", AUTHORITY, "--kind", "PDF"))  # fmt: skip
    record_id = out.split()[1]
    engine = sa.create_engine(database_url)
    try:
        head = SqlAuditLog(engine).head()[0]
    finally:
        engine.dispose()
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    cases = {
        "missing directory": (tmp_path / "no" / "such" / "dir" / "x.pdf", "does not exist"),
        "a directory": (tmp_path, "is a directory"),
        "under a file": (blocker / "x.pdf", "does not exist"),
    }
    for name, (target, why) in cases.items():
        result = _cli(medvault_service, "get", record_id, "-o", str(target))
        assert result.returncode != 0, f"{name}: get succeeded"
        assert "Traceback" not in result.stderr, f"{name}: a traceback was printed"
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, f"{name}: {len(lines)} error lines"
        assert lines[0].startswith(f"medvault: -o {target}"), f"{name}: the line names no path"
        assert why in lines[0], f"{name}: the line does not say why"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        result = _cli(medvault_service, "get", record_id, "-o", str(locked / "x.pdf"))
        assert "cannot write: Permission denied" in result.stderr, "unwritable dir not named"
    # Missing TLS files are found before the read too.
    env = {**medvault_service.cli_env(), "MEDVAULT_KEY": str(tmp_path / "absent.key")}
    result = subprocess.run(
        [sys.executable, "-m", "service", "get", record_id, "-o", str(tmp_path / "y.pdf")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.stderr.startswith("medvault: cannot read --key"), "missing key not named"
    assert not list(tmp_path.glob("*.partial")), "a partial file was left"
    assert _reads_of(database_url, record_id, head) == 0, "a failed get was audited as a read"

    # The control: a get that delivers is audited once, so the count above can see one.
    _ok(_cli(medvault_service, "get", record_id, "-o", str(tmp_path / "copy.pdf")))
    assert _reads_of(database_url, record_id, head) == 1, "the delivered read is not audited"


def test_health_serves_and_names_what_does_not(medvault_service: RunningService) -> None:
    """`medvault health` is the container probe: 0 while serving, 1 naming a service that
    is not (a probe must not hang or pass on an unknown name)."""
    out = _ok(_cli(medvault_service, "health", "--dependencies"))
    assert out.split("\n") == [
        "medvault: SERVING",
        "medvault.dependency.database: SERVING",
        "medvault.dependency.object_store: SERVING",
        "medvault.dependency.token: SERVING",
        "",
    ]
    unknown = _cli(medvault_service, "health", "--quiet", "--service", "no.such.service")
    assert unknown.returncode != 0
    assert unknown.stdout == ""
    assert "NOT_FOUND" in unknown.stderr or "not found" in unknown.stderr.lower()
