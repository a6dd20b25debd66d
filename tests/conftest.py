"""Shared fixtures: the real components (SoftHSM2, SeaweedFS, SQLite and PostgreSQL)."""

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


# Modules that take half a minute or more (both backends, on the 2-core CI machine).
# They are handed to the workers first (pytest-xdist's loadscope schedules modules in
# collection order), so that the run does not end with one worker alone on a long
# module while the others idle. Order only: every test still runs.
SLOW_FIRST = (
    "tests/faults/test_cluster.py",
    "tests/faults/test_postgres_outage.py",
    "tests/faults/test_write_path_kills.py",
    "tests/integration/access/test_dicom_network.py",
    "tests/integration/keys/test_rewrap_resume.py",
    "tests/integration/service/test_resilience.py",
    "tests/integration/service/test_cli.py",
    "tests/integration/test_localstack.py",
    "tests/integration/backup/test_operator_cli.py",
    "tests/integration/service/test_processes.py",
    "tests/integration/access/test_deadlines.py",
    "tests/faults/test_s3_outage.py",
    "tests/integration/backup/test_drill_sampled.py",
    "tests/integration/storage/test_indoubt_commit.py",
    "tests/integration/bench/test_put_get_bench.py",
    "tests/fuzz/test_atheris.py",
    "tests/integration/service/test_replicas.py",
    "tests/integration/backup/test_backup_crash.py",
    "tests/integration/access/test_officer_view.py",
    "tests/integration/backup/test_schedule_election.py",
    "tests/integration/backup/test_schedule_replicas.py",
    "tests/integration/keys/test_rotation.py",
    "tests/integration/keys/test_signer_cli.py",
    "tests/integration/access/test_rpc_fuzz.py",
    "tests/integration/access/test_mllp.py",
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
