"""Shared fixtures: the real components (SoftHSM2, SeaweedFS, SQLite and PostgreSQL)."""

import logging
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.zygote import Zygote

pytest_plugins = [
    "tests.fixtures.softhsm",
    "tests.fixtures.seaweed",
    "tests.fixtures.databases",
    "tests.fixtures.service",
    "tests.fixtures.private_postgres",
]


def pytest_configure(config):  # type: ignore[no-untyped-def]
    config.addinivalue_line(
        "markers", "backend(name): only meaningful on that database backend (sqlite, postgresql)"
    )


# Modules that take 11 s or more, longest first, with their wall time in a run of
# deploy/test.sh on the 2-core CI machine (MEDVAULT_TEST_TIMELINE, two quiet runs
# averaged, 2026-12-01; a worker's first module also carries its session's setup). They are
# handed to the workers first (deploy/test.sh runs loadscope with --no-loadscope-reorder,
# so modules go out in collection order), so that the run does not end with one worker
# alone on a long module while the others idle. Order only: every test still runs.
SLOW_FIRST = (
    "tests/faults/test_cluster.py",  # 133 s
    "tests/integration/access/test_dicom_network.py",  # 89 s
    "tests/integration/test_localstack.py",  # 56 s
    "tests/faults/test_postgres_outage.py",  # 55 s
    "tests/integration/service/test_resilience.py",  # 54 s
    "tests/integration/access/test_deadlines.py",  # 44 s
    "tests/integration/backup/test_restore_revocations.py",  # 44 s (new, main at 52b7f3d)
    "tests/integration/access/test_dicom_spool.py",  # 41 s
    "tests/integration/access/test_rpc_fuzz.py",  # 41 s
    "tests/integration/access/test_cancelled_put.py",  # 37 s
    "tests/integration/backup/test_backup_constraints.py",  # 36 s
    "tests/integration/backup/test_operator_cli.py",  # 36 s
    "tests/integration/service/test_replicas.py",  # 34 s
    "tests/integration/keys/test_rotation.py",  # 33 s
    "tests/integration/backup/test_backup_snapshot.py",  # 33 s
    "tests/integration/access/test_completeness.py",  # 30 s
    "tests/integration/service/test_cli_bulk.py",  # 28 s
    "tests/faults/test_s3_outage.py",  # 26 s
    "tests/integration/service/test_cli_search.py",  # 26 s
    "tests/integration/backup/test_schedule_replicas.py",  # 25 s
    "tests/integration/backup/test_schedule_election.py",  # 25 s
    "tests/integration/service/test_processes.py",  # 24 s
    "tests/integration/backup/test_schedule_lock_held.py",  # 23 s
    "tests/unit/service/test_lazy_imports.py",  # 21 s
    "tests/integration/storage/test_seaweed_ports.py",  # 21 s
    "tests/integration/service/test_cli.py",  # 20 s
    "tests/integration/access/test_edge.py",  # 19 s
    "tests/integration/storage/test_sql_metadata.py",  # 18 s
    "tests/integration/signing/test_signing.py",  # 18 s
    "tests/integration/access/test_dependency_health.py",  # 17 s
    "tests/integration/backup/test_run_ledger_forged.py",  # 17 s
    "tests/integration/access/test_officer_view.py",  # 16 s
    "tests/integration/access/test_row_binding.py",  # 16 s
    "tests/integration/storage/test_audit_log.py",  # 15 s
    "tests/integration/access/test_upload_slots.py",  # 15 s
    "tests/integration/backup/test_restore_roundtrip.py",  # 14 s
    "tests/faults/test_write_path_kills.py",  # 14 s
    "tests/integration/backup/test_drill_report.py",  # 13 s
    "tests/integration/access/test_fail_closed.py",  # 13 s
    "tests/integration/keys/test_rewrap_resume.py",  # 13 s
    "tests/integration/access/test_revocation_rollback.py",  # 13 s (new, main at 52b7f3d)
    "tests/integration/service/test_tamper.py",  # 12 s
    "tests/integration/access/test_mllp.py",  # 12 s
    "tests/integration/access/test_audit_poisoning.py",  # 12 s
    "tests/integration/bench/test_put_get_bench.py",  # 12 s
    "tests/integration/access/test_read_admission.py",  # 12 s
    "tests/integration/storage/test_forged_types.py",  # 12 s
    "tests/integration/signing/test_signing_audit.py",  # 12 s
    "tests/integration/service/test_audit_trail.py",  # 11 s
    "tests/integration/backup/test_drill_sampled.py",  # 11 s
    "tests/integration/service/test_cli_connect.py",  # 11 s
)


def _slow_rank(item) -> int:  # type: ignore[no-untyped-def]
    path = item.nodeid.split("::", 1)[0]
    return SLOW_FIRST.index(path) if path in SLOW_FIRST else len(SLOW_FIRST)


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    """Deselect (not skip) backend-specific tests for the other backend: the case does not
    exist there, so nothing is being skipped. Then put the slow modules first (stable:
    the rest keep their order; every worker computes the same order)."""
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("backend")
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("database_url") if callspec else None
        if marker and backend and backend != marker.args[0]:
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    items.sort(key=_slow_rank)


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A test that runs the CLI in this process (``service.cli.main`` calls
    ``service.logs.setup``) replaces the root logger's handlers with one writing to the
    stderr of the moment: pytest's capture, closed after that test. A later test's log
    record then failed in that handler ("--- Logging error ---", a traceback quoting the
    test's source). Each test gets the root logger's handlers and level back as they were."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# MEDVAULT_TEST_TIMELINE=<file>: each worker appends "worker, start, end, test id, CPU"
# per test (tab-separated, epoch seconds, CPU seconds), to see how a run's modules fill
# the workers, which one ends it and which cost the most CPU (README, The two commands).
if _timeline := os.environ.get("MEDVAULT_TEST_TIMELINE"):
    _TICKS = os.sysconf("SC_CLK_TCK")

    def _cpu() -> float:
        """CPU seconds of this worker and of its children reaped so far (a subprocess
        counts when it is waited for), with the servers its zygote forked and reaped (a
        server counts once stopped; the zygote's own CPU, reaped at the session's end, is
        in the worker's last test)."""
        own, children = (
            resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        )
        forked = 0.0
        for pid in Zygote.running:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            forked += sum(int(f) for f in fields[13:15]) / _TICKS  # cutime, cstime
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime + forked

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):  # type: ignore[no-untyped-def]
        began, cpu = time.time(), _cpu()
        yield
        with open(_timeline, "a", encoding="utf-8") as out:
            worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
            out.write(
                f"{worker}\t{began:.2f}\t{time.time():.2f}\t{item.nodeid}\t{_cpu() - cpu:.2f}\n"
            )
