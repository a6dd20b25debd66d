"""Fixtures of the storage integration tests: the scheduled-work ledger, MACed in the token."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import Engine

from keystore import Pkcs11BlindIndexer, Pkcs11SessionPool
from storage import WorkLedger, WorkSealer


@pytest.fixture
def work_sealer(keystore_pool: Pkcs11SessionPool) -> WorkSealer:
    """MACs ``scheduled_work`` rows under the test token's key, as the service does."""
    return WorkSealer(Pkcs11BlindIndexer(keystore_pool))


@pytest.fixture
def forged_work() -> list[str]:
    """``scheduled_work`` rows reported as forged (the service: a ``run-tampered`` incident)."""
    return []


@pytest.fixture
def work_ledger(
    metadata_engine: Engine, work_sealer: WorkSealer, forged_work: list[str]
) -> WorkLedger:
    """The ledger on the store tests' database, reporting to ``forged_work``."""
    return WorkLedger(metadata_engine, work_sealer, forged_work.append)
