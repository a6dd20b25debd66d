"""CI's short budget of coverage-guided fuzzing: each atheris target of
``tests/fuzz/targets.py`` (but ``cms``, see there) for a fixed number of inputs, in its
own process.

The run fails on a crash (an undocumented exception type or a broken property: the
target raises), on a hang (libFuzzer's per-input ``-timeout``, and the subprocess's own
timeout), and on memory past ``-rss_limit_mb``. The seed is fixed, so a failure
replays. ``bench/fuzz.sh --atheris`` runs the same targets for as long as one likes.

PYTEST_DONT_REWRITE: a failure shows libFuzzer's report (synthetic input only).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parents[2]
RUNS = 200
PER_INPUT_SECONDS = 10
PROCESS_SECONDS = 90  # start-up (imports under instrumentation) and RUNS inputs, loaded machine


def fuzz(name: str, workdir: Path, runs: int = RUNS) -> subprocess.CompletedProcess[str]:
    """Run target ``name`` for ``runs`` inputs with CI's flags."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # The corpus in the test's own folder: left to its default, each run made a folder of
    # its own under /tmp and never removed it (9 per run of the suite).
    env["MEDVAULT_FUZZ_CORPUS"] = str(workdir / "corpus")
    env.pop("MEDVAULT_FUZZ_DEEP", None)
    command = [
        sys.executable, "-m", "tests.fuzz.run", name, f"--inputs={runs}", "-seed=1",
        f"-timeout={PER_INPUT_SECONDS}", "-rss_limit_mb=1536", "-max_len=8192",
        f"-artifact_prefix={workdir}/",
    ]  # fmt: skip
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=PROCESS_SECONDS, check=False)  # fmt: skip


@pytest.mark.timeout(PROCESS_SECONDS + 30)
@pytest.mark.parametrize("name", [name for name, spec in TARGETS.items() if spec.ci])
def test_target_survives_its_budget(name: str, tmp_path: Path) -> None:
    try:
        done = fuzz(name, tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: no end within {PROCESS_SECONDS} s (a hang)")
    report = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
    assert done.returncode == 0, f"{name}: fuzzer exit {done.returncode}\n{report}"
    assert f"Done {RUNS} inputs" in done.stderr, f"{name}: did not run {RUNS} inputs\n{report}"
    assert not list(tmp_path.glob("crash-*")) + list(tmp_path.glob("timeout-*"))


def test_a_crash_fails_the_run(tmp_path: Path) -> None:
    """The harness sees a finding: a target raising an undocumented type exits non-zero
    and leaves the input (so a real finding cannot pass as a clean run)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = (
        "import atheris, sys\n"
        "def target(data):\n"
        "    if data[:1] == b'Z': raise KeyError('undocumented')\n"
        "atheris.Setup([sys.argv[0], '-atheris_runs=100000', '-seed=1', "
        f"'-artifact_prefix={tmp_path}/', '{tmp_path}/corpus'], target)\n"
        "atheris.Fuzz()\n"
    )  # fmt: skip
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "seed").write_bytes(b"Y")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=PROCESS_SECONDS, check=False)  # fmt: skip
    assert done.returncode != 0
    assert "KeyError" in done.stdout + done.stderr
    assert list(tmp_path.glob("crash-*"))
