"""How long the ``medvault`` command takes before it does anything: issue 12's target.

Run from the project root::

    .venv/bin/python bench/cli_startup.py            # 20 runs of each
    .venv/bin/python bench/cli_startup.py --runs 50

Side by side, alternating so a busy machine disturbs all alike, each run a fresh process:

- the floor: ``python -c pass`` with the same interpreter (start-up and ``site``, which
  includes the editable install's import hook);
- ``medvault --help``, ``medvault --version``, an argument error (``medvault ls`` without
  its patient), and ``medvault ls --help`` (one command's module: gRPC, the messages);

reporting the median and p90 wall time and the median CPU time (user + system, from
``resource``: the figure a shared machine disturbs least), and each median's ratio to
the floor. Target, printed PASS/MISS: ``medvault --help`` <= 0.25 s wall (median). Exit
status 0 whatever the result: a benchmark informs, it does not gate.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEDVAULT = ROOT / ".venv" / "bin" / "medvault"
TARGET_HELP_SECONDS = 0.25


def _cases() -> dict[str, list[str]]:
    return {
        "python -c pass (floor)": [sys.executable, "-c", "pass"],
        "medvault --help": [str(MEDVAULT), "--help"],
        "medvault --version": [str(MEDVAULT), "--version"],
        "medvault ls (argument error)": [str(MEDVAULT), "ls"],
        "medvault ls --help": [str(MEDVAULT), "ls", "--help"],
    }


def _run_once(argv: list[str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                   env={**os.environ, "MEDVAULT_ENDPOINT": ""}, timeout=60)  # fmt: skip
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> int:
    """Measure, print the table and the target's PASS/MISS."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="runs of each case (default 20)")
    ns = ap.parse_args()
    if not MEDVAULT.is_file():
        print(f"error: {MEDVAULT} is missing; run deploy/up.sh or deploy/test.sh first",
              file=sys.stderr)  # fmt: skip
        return 1
    cases = _cases()
    walls: dict[str, list[float]] = {name: [] for name in cases}
    cpus: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(ns.runs):
        for name, argv in cases.items():
            wall, cpu = _run_once(argv)
            walls[name].append(wall)
            cpus[name].append(cpu)
    floor = statistics.median(walls["python -c pass (floor)"])
    load = os.getloadavg()[0]
    print(f"{ns.runs} runs each, load average {load:.1f} on {os.cpu_count()} cores")
    print(f"{'case':34} {'wall p50':>9} {'wall p90':>9} {'CPU p50':>9} {'÷ floor':>8}")
    for name in cases:
        p50 = statistics.median(walls[name])
        p90 = statistics.quantiles(walls[name], n=10)[-1] if ns.runs >= 2 else p50
        cpu = statistics.median(cpus[name])
        print(f"{name:34} {p50:8.3f}s {p90:8.3f}s {cpu:8.3f}s {p50 / floor:7.1f}x")
    help_p50 = statistics.median(walls["medvault --help"])
    verdict = "PASS" if help_p50 <= TARGET_HELP_SECONDS else "MISS"
    print(f"{verdict}: medvault --help {help_p50:.3f} s wall (median) <= "
          f"{TARGET_HELP_SECONDS} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
