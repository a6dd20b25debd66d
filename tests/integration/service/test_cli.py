"""The ``medvault`` CLI (put, ls, get, stat) as subprocesses against the shared server.

PYTEST_DONT_REWRITE: a failed assertion shows no values, since they could look like
patient data; the helpers in calls.py name what differs instead.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

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
