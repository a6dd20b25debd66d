"""Each dependency's health in the standard gRPC health service, as operators' tools
(grpc_health_probe, Kubernetes probes) read it: the object store going away shows as
``medvault.dependency.object_store`` NOT_SERVING while the database and token stay
SERVING, and it comes back by itself."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.health import PREFIX
from tests.fixtures.seaweed import S3Server
from tests.fixtures.service import DEFAULT_POLICY, RunningService
from tests.integration.access.helpers import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DEPENDENCIES = ("database", "object_store", "token")


def _statuses(service: RunningService) -> dict[str, int]:
    with service.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        out = {}
        for name in DEPENDENCIES:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=PREFIX + name),
                                   timeout=10)  # fmt: skip
                out[name] = reply.status
            except grpc.RpcError as e:
                out[name] = -1 if e.code() == grpc.StatusCode.NOT_FOUND else -2
        return out


def test_object_store_outage_shows_on_its_own_and_recovers(
    service_factory: Any, fresh_database: str, own_s3: S3Server
) -> None:
    service: RunningService = service_factory(
        fresh_database, policy=DEFAULT_POLICY.read_text(), s3=own_s3, health_probe_seconds=0.5
    )
    try:
        wait_for(lambda: _statuses(service) == dict.fromkeys(DEPENDENCIES, SERVING),
                 timeout=30, what="every dependency serving")  # fmt: skip
        own_s3.server.stop(timeout=1)  # SIGTERM, then SIGKILL: weed's filer waits 15 s
        expected_down = {"database": SERVING, "object_store": NOT_SERVING, "token": SERVING}
        wait_for(lambda: _statuses(service) == expected_down, timeout=60,
                 what="object store not serving, the rest serving")  # fmt: skip
        own_s3.server.start()
        wait_for(lambda: _statuses(service) == dict.fromkeys(DEPENDENCIES, SERVING),
                 timeout=60, what="object store serving again")  # fmt: skip
        log = service.log_path.read_text()
        assert '"dependency not serving"' in log
        assert '"dependency": "object_store"' in log
    finally:
        service.stop()
