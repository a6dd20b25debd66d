"""Attack: a database writer stops the elected periodic work (orphan sweep, key pruning)
for ever by dating its last run in the future.

``WorkLedger.claim`` skips a round that ran less than the interval before; a ``last_run_at``
years ahead made every later round look too early. A date more than one interval ahead
is not a run any replica's clock made: the round is claimed.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.engine import Engine

from storage import WorkLedger, WorkSealer
from storage.work_ledger import scheduled_work

pytestmark = pytest.mark.integration
GAP = timedelta(minutes=10)


def test_rounds_are_claimed_once_per_gap(work_ledger: WorkLedger) -> None:
    name, now = f"t-{uuid.uuid4().hex[:8]}", datetime(2026, 3, 1, tzinfo=UTC)
    assert work_ledger.claim(name, GAP, now, "a")
    assert not work_ledger.claim(name, GAP, now + GAP / 2, "b")
    # A replica whose clock runs slightly behind the last claimer's is turned away too.
    assert not work_ledger.claim(name, GAP, now - timedelta(seconds=5), "b")
    assert work_ledger.claim(name, GAP, now + GAP, "b")
    assert work_ledger.last_run(name) == (now + GAP, "b")


def test_a_last_run_dated_ahead_does_not_stop_the_work(
    metadata_engine: Engine, work_ledger: WorkLedger, work_sealer: WorkSealer,
    forged_work: list[str],
) -> None:  # fmt: skip
    """An authentic row (MACed: a replica whose clock ran years ahead) dated ahead."""
    name, now = f"t-{uuid.uuid4().hex[:8]}", datetime(2026, 3, 1, tzinfo=UTC)
    assert work_ledger.claim(name, GAP, now, "a")
    ahead = now + timedelta(days=3650)
    with metadata_engine.begin() as connection:
        connection.execute(
            scheduled_work.update()
            .where(scheduled_work.c.name == name)
            .values(last_run_at=ahead, mac=work_sealer.mac(name, ahead, "a"))
        )
    assert work_ledger.claim(name, GAP, now + GAP, "a"), "the work stopped"
    assert work_ledger.last_run(name) == (now + GAP, "a")
    assert forged_work == []  # no writer's row: nothing reported
