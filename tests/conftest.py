"""Shared fixtures: the real components (SoftHSM2, SeaweedFS, SQLite and PostgreSQL)."""

pytest_plugins = [
    "tests.fixtures.softhsm",
    "tests.fixtures.seaweed",
    "tests.fixtures.databases",
    "tests.fixtures.service",
]
