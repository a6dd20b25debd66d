"""deploy/bootstrap.sh waits for apt's lock instead of failing (a fake apt-get on PATH)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_FAKE = """#!/usr/bin/env bash
n=$(( $(cat "$COUNT" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$COUNT"
echo "$*" >> "$COUNT.args"
if [ "$n" -le "$BUSY" ]; then
    echo "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 1 (apt-get)" >&2
    exit 100
fi
exit "$FINALLY"
"""


def _apt_get(tmp_path: Path, busy: int, finally_: int) -> tuple[int, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"
    fake.write_text(_FAKE)
    fake.chmod(0o755)
    count = tmp_path / "count"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "COUNT": str(count),
           "BUSY": str(busy), "FINALLY": str(finally_), "MEDVAULT_APT_RETRY_SECONDS": "0",
           "MEDVAULT_BOOTSTRAP_FUNCTIONS_ONLY": "1"}  # fmt: skip
    script = 'source deploy/bootstrap.sh; as_root() { "$@"; }; apt_get update'
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    calls = Path(f"{count}.args").read_text().splitlines()
    return result.returncode, calls


def test_a_held_lock_is_waited_for(tmp_path: Path) -> None:
    status, calls = _apt_get(tmp_path, busy=2, finally_=0)
    assert status == 0
    assert len(calls) == 3, "apt-get was not retried while its lock was held"
    assert all(c.startswith("-o DPkg::Lock::Timeout=") for c in calls), "dpkg lock not waited"


@pytest.mark.parametrize("busy", [0, 1])
def test_other_failures_are_not_retried(tmp_path: Path, busy: int) -> None:
    status, calls = _apt_get(tmp_path, busy=busy, finally_=1)
    assert status == 1
    assert len(calls) == busy + 1
