"""Completeness: 8 concurrent clients x 125 reads leave exactly 1000 read events.

Each client has its own channel (its own connection); every read must be one committed
"allowed" records.read event of that principal, and the chain must verify afterwards.
PostgreSQL runs the same (slower: one fsync per group commit over TCP).

PYTEST_DONT_REWRITE: failures name counts only.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from service._gen.medvault.v1 import audit_pb2 as aupb
from tests.fixtures.service import RunningService
from tests.integration.access.helpers import (
    client,
    events,
    fetch,
    grant,
    new_patient,
    put_record,
    verify,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
CLIENTS = 8
# 1000 reads race as well as 4000 did (8 connections, group commits) in a quarter of
# the time; the count must still match exactly.
READS = 125
READER = "physician-volume"


def test_concurrent_reads_are_all_audited(
    service_factory: Any, fresh_database: str, issue: Any
) -> None:
    service: RunningService = service_factory(fresh_database)
    try:
        clerk = client(service, issue("clerk-volume", "records_clerk"))
        officer = client(service, issue("officer-volume", "security_officer"))
        patient = new_patient()
        contents = [f"synthetic note {n}".encode() for n in range(CLIENTS)]
        records = [put_record(clerk, patient, c) for c in contents]
        grant(clerk, patient, READER)
        cert = issue(READER, "physician")
        errors: list[str] = []
        lock = threading.Lock()

        def reader(n: int) -> None:
            c = client(service, cert)
            try:
                for i in range(READS):
                    k = (n + i) % CLIENTS
                    fetched = fetch(c, records[k].id)
                    if fetched.error is not None or fetched.content != contents[k]:
                        with lock:
                            errors.append(f"client {n} read {i}: {fetched.code.name}")
                        return
            finally:
                c.close()

        started = time.monotonic()
        threads = [threading.Thread(target=reader, args=(n,)) for n in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        assert not errors, "; ".join(errors[:5])

        reads = events(
            officer, principal=READER, action="records.read", outcome=aupb.OUTCOME_ALLOWED
        )
        assert len(reads) == CLIENTS * READS, (
            f"{len(reads)} read events for {CLIENTS * READS} reads"
        )
        sequences = [e.sequence for e in reads]
        assert len(set(sequences)) == len(sequences), "duplicate sequence numbers"
        assert {e.resource for e in reads} == {f"record/{r.id}/v{r.version}" for r in records}, (
            "read events name other resources"
        )
        others = events(officer, principal=READER, outcome=aupb.OUTCOME_DENIED)
        assert not others, f"{len(others)} denied events"
        result = verify(officer)
        assert result.ok, f"chain broken: {result.first_bad_sequence} {result.reason}"
        assert result.events_checked >= CLIENTS * READS, "verification skipped events"
        print(
            f"\n{CLIENTS * READS} audited reads in {elapsed:.1f} s "
            f"({CLIENTS * READS / elapsed:.0f}/s)"
        )
        clerk.close()
        officer.close()
    finally:
        service.stop()
