"""Attack: a database writer stops the elected periodic work (orphan sweep, key pruning)
for ever by dating its last run in the future.

``claim_round`` skips a round that ran less than the interval before; a ``last_run_at``
years ahead made every later round look too early. A date more than one interval ahead
is not a run any replica's clock made: the round is claimed.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.engine import Engine

from storage.work_ledger import claim_round, last_run, scheduled_work

pytestmark = pytest.mark.integration
GAP = timedelta(minutes=10)


def test_rounds_are_claimed_once_per_gap(metadata_engine: Engine) -> None:
    name, now = f"t-{uuid.uuid4().hex[:8]}", datetime(2026, 3, 1, tzinfo=UTC)
    assert claim_round(metadata_engine, name, GAP, now, "a")
    assert not claim_round(metadata_engine, name, GAP, now + GAP / 2, "b")
    # A replica whose clock runs slightly behind the last claimer's is turned away too.
    assert not claim_round(metadata_engine, name, GAP, now - timedelta(seconds=5), "b")
    assert claim_round(metadata_engine, name, GAP, now + GAP, "b")
    assert last_run(metadata_engine, name) == (now + GAP, "b")


def test_a_last_run_dated_ahead_does_not_stop_the_work(metadata_engine: Engine) -> None:
    name, now = f"t-{uuid.uuid4().hex[:8]}", datetime(2026, 3, 1, tzinfo=UTC)
    assert claim_round(metadata_engine, name, GAP, now, "a")
    with metadata_engine.begin() as connection:
        connection.execute(
            scheduled_work.update()
            .where(scheduled_work.c.name == name)
            .values(last_run_at=now + timedelta(days=3650))
        )
    assert claim_round(metadata_engine, name, GAP, now + GAP, "a"), "the work stopped"
    assert last_run(metadata_engine, name) == (now + GAP, "a")
