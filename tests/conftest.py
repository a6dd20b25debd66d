"""Shared fixtures: the real components (SoftHSM2, SeaweedFS, SQLite and PostgreSQL)."""

import os
import resource
import time

import pytest

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


# Modules that take 12 s or more, longest first, with their time in a quiet run of
# deploy/test.sh on the 2-core CI machine (MEDVAULT_TEST_TIMELINE, 2026-11-30). They are
# handed to the workers first (deploy/test.sh runs loadscope with --no-loadscope-reorder,
# so modules go out in collection order), so that the run does not end with one worker
# alone on a long module while the others idle. Order only: every test still runs.
SLOW_FIRST = (
    "tests/faults/test_cluster.py",  # 141 s
    "tests/integration/access/test_dicom_network.py",  # 69 s
    "tests/integration/backup/test_backup_snapshot.py",  # 59 s (session 9: ended the run last)
    "tests/integration/service/test_resilience.py",  # 48 s
    "tests/integration/test_localstack.py",  # 47 s
    "tests/faults/test_postgres_outage.py",  # 45 s
    "tests/integration/access/test_deadlines.py",  # 41 s
    "tests/integration/service/test_replicas.py",  # 37 s
    "tests/integration/access/test_cancelled_put.py",  # 36 s (2026-11-30, session 5)
    "tests/integration/access/test_dependency_health.py",  # 37 s
    "tests/integration/keys/test_rotation.py",  # 34 s
    "tests/integration/backup/test_schedule_replicas.py",  # 33 s
    "tests/integration/backup/test_operator_cli.py",  # 33 s
    "tests/integration/access/test_edge.py",  # 28 s
    "tests/integration/storage/test_s3_blobs.py",  # 28 s
    "tests/integration/access/test_rpc_fuzz.py",  # 25 s
    "tests/integration/signing/test_signing.py",  # 24 s (session 5)
    "tests/integration/backup/test_schedule_election.py",  # 24 s
    "tests/integration/access/test_completeness.py",  # 24 s
    "tests/integration/service/test_cli_bulk.py",  # 23 s
    "tests/faults/test_s3_outage.py",  # 22 s
    "tests/integration/storage/test_seaweed_ports.py",  # 21 s
    "tests/integration/service/test_audit_trail.py",  # 20 s
    "tests/integration/access/test_officer_view.py",  # 20 s
    "tests/integration/access/test_mllp.py",  # 20 s
    "tests/integration/bench/test_put_get_bench.py",  # 19 s
    "tests/faults/test_write_path_kills.py",  # 18 s
    "tests/integration/access/test_row_binding.py",  # 18 s
    "tests/integration/access/test_upload_slots.py",  # 17 s
    "tests/integration/service/test_roundtrip.py",  # 17 s
    "tests/integration/access/test_read_admission.py",  # 15 s (session 5)
    "tests/integration/access/test_fail_closed.py",  # 14 s (session 5)
    "tests/integration/access/test_audit_integrity.py",  # 14 s
    "tests/integration/backup/test_drill_report.py",  # 14 s
    "tests/integration/service/test_processes.py",  # 14 s
    "tests/integration/access/test_search.py",  # 13 s
    "tests/integration/backup/test_backup_verify.py",  # 13 s
    "tests/integration/access/test_audit_poisoning.py",  # 13 s
    "tests/integration/service/test_tamper.py",  # 13 s
    "tests/integration/service/test_cli_search.py",  # 12 s
    "tests/integration/storage/test_audit_log.py",  # 12 s
    "tests/integration/access/test_break_glass_queue.py",  # 12 s
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


# MEDVAULT_TEST_TIMELINE=<file>: each worker appends "worker, start, end, test id, CPU"
# per test (tab-separated, epoch seconds, CPU seconds), to see how a run's modules fill
# the workers, which one ends it and which cost the most CPU (README, The two commands).
if _timeline := os.environ.get("MEDVAULT_TEST_TIMELINE"):

    def _cpu() -> float:
        """CPU seconds of this worker and of its children reaped so far (the servers a
        module started count when its fixtures stop them, in its last test)."""
        own, children = (
            resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        )
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):  # type: ignore[no-untyped-def]
        began, cpu = time.time(), _cpu()
        yield
        with open(_timeline, "a", encoding="utf-8") as out:
            worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
            out.write(
                f"{worker}\t{began:.2f}\t{time.time():.2f}\t{item.nodeid}\t{_cpu() - cpu:.2f}\n"
            )
