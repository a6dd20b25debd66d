"""Attack: probe for methods the server does not have; they must not go unaudited.

An unknown method answers UNIMPLEMENTED after the caller is authenticated, within its
call share, with one denied ``server.unknown_method`` event naming the method
(normalised: the caller chose it).

PYTEST_DONT_REWRITE: failures name codes and counts, never what was sent.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import records_pb2 as pb
from service.edge import UNKNOWN_METHOD_ACTION
from tests.fixtures.service import DEFAULT_POLICY, RunningService, free_port
from tests.integration.access.helpers import (
    TIMEOUT,
    Client,
    Metrics,
    client,
    events,
    new_patient,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SHARE = 2
# Long enough that the probes of the share test are answered, on a loaded machine, while
# its holders still wait for content (they are released before that anyway).
DEADLINE = 10.0
PUT = "/medvault.v1.RecordService/PutRecord"


@dataclass
class World:
    service: RunningService
    certs: dict[str, tuple[Path, Path]]
    officer: Client
    metrics: Metrics


@pytest.fixture(scope="module")
def world(service_factory: Any, fresh_database: str, issue: Any) -> Iterator[World]:
    metrics_port = free_port()
    service: RunningService = service_factory(
        fresh_database, policy=DEFAULT_POLICY.read_text(),
        max_calls_per_principal=SHARE, first_message_seconds=DEADLINE, idle_seconds=DEADLINE,
        refusal_summary_seconds=1.0, metrics_listen=f"127.0.0.1:{metrics_port}",
        health_probe_seconds=3600,  # no probe job beside the holders' (medvault_worker_jobs)
    )  # fmt: skip
    certs = {
        "clerk": issue("probe-clerk", "records_clerk"),
        "nobody": issue("probe-nobody"),
    }
    officer = client(service, issue("probe-officer", "security_officer"))
    yield World(service, certs, officer, Metrics(metrics_port))
    officer.close()
    service.stop()


def _header() -> bytes:
    head = pb.RecordHeader(
        patient=new_patient(), kind=pb.RECORD_KIND_OTHER, content_type="text/plain"
    )
    return pb.PutRecordRequest(header=head).SerializeToString()


def _call(channel: grpc.Channel, method: str) -> grpc.StatusCode:
    try:
        channel.unary_unary(method)(b"\x0a\x00", timeout=TIMEOUT)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _probes(w: World, principal: str) -> list[aupb.AuditEvent]:
    return events(w.officer, principal=principal, action=UNKNOWN_METHOD_ACTION)


@pytest.mark.parametrize("who", ["clerk", "nobody"])
def test_unknown_method_is_unimplemented_and_audited_once(world: World, who: str) -> None:
    channel = world.service.channel(*world.certs[who])
    principal = f"probe-{who}"
    try:
        for method in ("/medvault.v1.RecordService/Nope", "/x.Y/Z"):
            before = len(_probes(world, principal))
            assert _call(channel, method) == grpc.StatusCode.UNIMPLEMENTED, method
            found = _probes(world, principal)
            assert len(found) == before + 1, f"{method}: {len(found) - before} events"
            event = found[-1]
            assert event.resource == method
            assert event.outcome == aupb.OUTCOME_DENIED
            assert event.status == "UNIMPLEMENTED"
    finally:
        channel.close()


def test_hostile_method_name_is_normalised(world: World) -> None:
    channel = world.service.channel(*world.certs["clerk"])
    try:
        long_name = "/x.Y/" + "Z" * 300
        assert _call(channel, long_name) == grpc.StatusCode.UNIMPLEMENTED
        assert _call(channel, "/x.Y/a b%00;'") == grpc.StatusCode.UNIMPLEMENTED
    finally:
        channel.close()
    resources = [e.resource for e in _probes(world, "probe-clerk")]
    assert any(r.startswith("/x.Y/ZZZ") and r.endswith("...[cut]") for r in resources)
    assert all(len(r) <= 130 for r in resources), "a method name was kept at full length"
    assert "/x.Y/a?b?00??" in resources


def test_unknown_methods_respect_the_call_share(world: World) -> None:
    """A caller holding its whole share gets RESOURCE_EXHAUSTED, not another event each."""
    channel = world.service.channel(*world.certs["clerk"])
    held: list[grpc.RpcError] = []
    gate = threading.Event()

    def header_only() -> Iterator[bytes]:
        yield _header()  # the upload's worker starts: the server counts it (see below)
        gate.wait(TIMEOUT)  # hold the stream open without content

    def hold() -> None:
        try:
            channel.stream_unary(PUT)(header_only(), timeout=TIMEOUT)
        except grpc.RpcError as e:
            held.append(e)

    threads = [threading.Thread(target=hold) for _ in range(SHARE)]
    try:
        for thread in threads:
            thread.start()
        # Probing before the holders entered would race them for the same two slots. Each
        # takes its slot, then its worker: with both workers counted, both hold theirs.
        wait_for(lambda: world.metrics.value("medvault_worker_jobs") == SHARE, 30,
                 "the holders' uploads in their workers")  # fmt: skip
        before = len(_probes(world, "probe-clerk"))
        codes = {_call(channel, "/x.Y/Held") for _ in range(10)}
        assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}, sorted(c.name for c in codes)
        assert len(_probes(world, "probe-clerk")) == before, "over-share probes audited each"
        assert not held, "a holder was refused"
    finally:
        gate.set()
        for thread in threads:
            thread.join()
        channel.close()
