"""deploy/bootstrap.sh's byte-code step is a saving, not a gate: a compileall failure
(an unwritable __pycache__, a module with a syntax error) is shown and the run goes on
to ruff, which reports a syntax error properly (a fake venv python fails compileall)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_FAKE_PYTHON = """#!/usr/bin/env bash
if [ "${2:-}" = compileall ]; then
    echo "*** Error compiling 'service/broken.py'..."
    exit 1
fi
exec "$REAL_PYTHON" "$@"
"""


def test_a_compileall_failure_is_shown_and_does_not_stop_the_run(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(_FAKE_PYTHON)
    python.chmod(0o755)
    # The stamp of this pyproject.toml: no pip install.
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    (venv / ".medvault-pyproject.sha256").write_text(f"{want}\n")
    env = {**os.environ, "REAL_PYTHON": sys.executable,
           "MEDVAULT_BOOTSTRAP_FUNCTIONS_ONLY": "1"}  # fmt: skip
    script = f'source deploy/bootstrap.sh; VENV="{venv}"; ensure_venv; echo went-on'
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "went-on" in result.stdout
    assert "service/broken.py" in result.stdout + result.stderr, "compileall's error hidden"
