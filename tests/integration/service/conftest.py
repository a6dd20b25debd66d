"""Fixtures of the RecordService integration tests: a client of the shared server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from tests.fixtures.service import RunningService
from tests.integration.service.streams import new_patient


@pytest.fixture
def stub(medvault_service: RunningService) -> Iterator[pb_grpc.RecordServiceStub]:
    """A RecordService client of the shared server (client certificate CN "test-app")."""
    with medvault_service.channel() as channel:
        yield pb_grpc.RecordServiceStub(channel)


@pytest.fixture
def patient() -> pb.PatientId:
    """A synthetic patient identifier used by this test only."""
    return new_patient()
