"""bench/put_get.py --quick runs on the local stack and reports every yardstick.

Not a timed assertion: the figures are whatever this machine gives; only the report's
shape is checked, and that every ratio is a positive finite number.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.service import ROOT

pytestmark = pytest.mark.integration

LATENCY_KEYS = {
    "size", "op", "n", "medvault_p50_ms", "raw_p50_ms", "floor_p50_ms", "medvault_p90_ms",
    "ratio", "medvault_per_s", "raw_per_s", "service_cpu_ms", "floor_cpu_ms",
}  # fmt: skip
THROUGHPUT_KEYS = {
    "size", "op", "clients", "seconds", "medvault_ops", "raw_ops", "medvault_per_s",
    "raw_per_s", "ratio", "medvault_p50_ms", "raw_p50_ms", "service_cpu_ms",
    "client_cpu_ms", "raw_client_cpu_ms", "floor_ops", "floor_per_s", "floor_ratio",
    "floor_p50_ms", "floor_cpu_ms", "floor_client_cpu_ms",
}  # fmt: skip


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_reports_every_yardstick(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    # The smallest run that still has every part: two sizes, two client counts.
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "put_get.py"), "--quick",
         "--sizes", "4KiB,512KiB", "--clients", "1,2", "--seconds", "0.2",
         "--ops-4k", "3", "--ops-512k", "2", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())

    latency = report["latency"]
    assert [(r["size"], r["op"]) for r in latency] == [
        ("4KiB", "put"), ("4KiB", "get"), ("512KiB", "put"), ("512KiB", "get"),
    ]  # fmt: skip
    for row in latency:
        assert set(row) == LATENCY_KEYS
        for key in ("medvault_p50_ms", "raw_p50_ms", "floor_p50_ms", "ratio"):
            assert _positive(row[key]), (row["size"], row["op"], key, row[key])
        assert row["ratio"] == pytest.approx(
            row["medvault_p50_ms"] / (row["raw_p50_ms"] + row["floor_p50_ms"])
        )
        assert row["service_cpu_ms"] >= 0
        assert row["floor_cpu_ms"] >= 0

    throughput = report["throughput"]
    assert [(t["size"], t["op"], t["clients"]) for t in throughput] == [
        ("512KiB", "put", 1), ("512KiB", "put", 2), ("512KiB", "get", 1), ("512KiB", "get", 2),
    ]  # fmt: skip
    for row in throughput:
        assert set(row) == THROUGHPUT_KEYS
        assert _positive(row["ratio"]), row
        assert _positive(row["floor_ratio"]), row
        assert row["medvault_ops"] > 0
        assert row["raw_ops"] > 0
        assert row["floor_ops"] > 0

    # The latency target is always judged; the 16-client target only when 16 ran.
    verdicts = report["verdicts"]
    assert len(verdicts) == 1
    assert verdicts[0]["target"].startswith("p50 at 1 client")
    assert isinstance(verdicts[0]["passed"], bool)
    line = "PASS" if verdicts[0]["passed"] else "MISS"
    assert f"{line} p50 at 1 client" in run.stdout
