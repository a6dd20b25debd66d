"""A caller with a share of one call may make its calls one after the other.

An EMR application that waits for each reply before its next call never holds more
than one call, so it must never be refused as over its share. Before, a streaming
reply's status could reach the client while the worker thread that produced the
stream was still finishing, and the call's slot came back only after that thread:
the next call, sent the moment the last one ended, was sometimes refused with
RESOURCE_EXHAUSTED (seen in CI on an officer's second QueryEvents). Now a stream's
worker has ended before its status is sent.

PYTEST_DONT_REWRITE: failures name counts and codes only.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import grpc
import pytest

from service._gen.medvault.v1 import audit_pb2 as aupb
from tests.fixtures.service import RunningService
from tests.integration.access.helpers import client, code_of, fetch, grant, new_patient, put_record

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROUNDS = 20


def test_streamed_calls_one_after_another_are_never_over_a_share_of_one(
    service_factory: Any, fresh_database: str, issue: Any
) -> None:
    service: RunningService = service_factory(fresh_database, max_calls_per_principal=1)
    clerk = client(service, issue("clerk-serial", "records_clerk"))
    officer = client(service, issue("officer-serial", "security_officer"))
    doctor = client(service, issue("physician-serial", "physician"))
    try:
        patient = new_patient()
        record = put_record(clerk, patient, b"synthetic serial note " * 200, chunk=1024)
        grant(clerk, patient, "physician-serial")
        codes: Counter[str] = Counter()
        for _ in range(ROUNDS):
            # Server-streaming replies produced in a worker thread, back to back.
            query = aupb.QueryEventsRequest(principal="clerk-serial")
            codes[code_of(officer.audit.QueryEvents, query, timeout=60).name] += 1
            codes[fetch(doctor, record.id, timeout=60).code.name] += 1
            codes[fetch(doctor, record.id, timeout=60).code.name] += 1
        assert codes == Counter({grpc.StatusCode.OK.name: 3 * ROUNDS}), dict(codes)
    finally:
        clerk.close()
        officer.close()
        doctor.close()
        service.stop()
