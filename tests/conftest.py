"""Shared fixtures: the real components (SoftHSM2, SeaweedFS, SQLite and PostgreSQL)."""

pytest_plugins = [
    "tests.fixtures.softhsm",
    "tests.fixtures.seaweed",
    "tests.fixtures.databases",
    "tests.fixtures.service",
]


def pytest_configure(config):  # type: ignore[no-untyped-def]
    config.addinivalue_line(
        "markers", "backend(name): only meaningful on that database backend (sqlite, postgresql)"
    )


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    """Deselect (not skip) backend-specific tests for the other backend: the case does not
    exist there, so nothing is being skipped."""
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
