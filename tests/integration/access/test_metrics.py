"""Prometheus metrics of every call: counted by method and final code, timed, and with
no caller-chosen label (an unknown method is ``other``) and no principal or patient."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service._gen.medvault.v1 import access_pb2 as apb
from service.metrics import CALL_TRAILER
from tests.fixtures.service import DEFAULT_POLICY, RunningService, free_port
from tests.integration.access.helpers import (
    TIMEOUT,
    Client,
    client,
    fetch,
    new_patient,
    put_record,
    wait_for,
)

pytestmark = pytest.mark.integration

GET = "RecordService/GetRecord"
PUT = "RecordService/PutRecord"


@dataclass
class World:
    service: RunningService
    metrics_port: int
    doctor: Client
    clerk: Client
    stranger: Client


@pytest.fixture(scope="module")
def world(service_factory: Any, fresh_database: str, issue: Any) -> Iterator[World]:
    port = free_port()
    service: RunningService = service_factory(
        fresh_database, policy=DEFAULT_POLICY.read_text(), metrics_listen=f"127.0.0.1:{port}"
    )
    w = World(
        service, port,
        doctor=client(service, issue("metrics-dr", "physician")),
        clerk=client(service, issue("metrics-clerk", "records_clerk")),
        stranger=client(service, issue("metrics-other-dr", "physician")),
    )  # fmt: skip
    yield w
    for c in (w.doctor, w.clerk, w.stranger):
        c.close()
    service.stop()


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("medvault_rpc_")
    }


def _calls(scraped: dict[Any, float], method: str, code: str) -> float:
    key = ("medvault_rpc_calls_total", (("code", code), ("method", method)))
    return scraped.get(key, 0.0)


def test_calls_are_counted_by_method_and_code_and_timed(world: World) -> None:
    before = _scrape(world.metrics_port)
    patient = new_patient()
    world.clerk.access.GrantAccess(
        apb.GrantAccessRequest(patient=patient, principal="metrics-dr"), timeout=TIMEOUT
    )
    record = put_record(world.doctor, patient, b"synthetic metrics note")
    assert fetch(world.doctor, record.id).error is None
    refused = fetch(world.stranger, record.id)
    assert refused.error is not None
    refused_code = refused.code.name
    timed = ("medvault_rpc_seconds_count", (("method", GET),))
    # A call is counted when its handler ends, which may be just after the client has
    # its last message: wait for the counts, then check they are exact.
    wait_for(lambda: _scrape(world.metrics_port).get(timed, 0.0) - before.get(timed, 0.0) >= 2
             and _calls(_scrape(world.metrics_port), PUT, "OK") > _calls(before, PUT, "OK"),
             what="the calls counted")  # fmt: skip
    after = _scrape(world.metrics_port)

    assert _calls(after, PUT, "OK") - _calls(before, PUT, "OK") == 1
    assert _calls(after, GET, "OK") - _calls(before, GET, "OK") == 1
    assert _calls(after, GET, refused_code) - _calls(before, GET, refused_code) == 1
    assert after[timed] - before.get(timed, 0.0) == 2


def test_unknown_methods_share_one_label(world: World) -> None:
    channel = world.doctor.channel
    for name in ("/x.Y/Probe1", "/medvault.v1.RecordService/Nope", "/a/" + "b" * 200):
        with pytest.raises(grpc.RpcError) as raised:
            channel.unary_unary(name)(b"", timeout=TIMEOUT)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    wait_for(lambda: _calls(_scrape(world.metrics_port), "other", "UNIMPLEMENTED") >= 3,
             what="the unknown calls counted")  # fmt: skip
    scraped = _scrape(world.metrics_port)
    methods = {dict(labels).get("method") for _, labels in scraped}
    assert _calls(scraped, "other", "UNIMPLEMENTED") >= 3
    assert not [m for m in methods if m and ("Probe1" in m or "Nope" in m or "bbb" in m)]


def test_no_label_names_a_principal_or_patient(world: World) -> None:
    patient = new_patient()
    world.clerk.access.GrantAccess(
        apb.GrantAccessRequest(patient=patient, principal="metrics-dr"), timeout=TIMEOUT
    )
    put_record(world.doctor, patient)
    scraped = _scrape(world.metrics_port)
    label_values = {v for _, labels in scraped for _, v in labels}
    assert not [v for v in label_values if "metrics-" in v or patient.id in v]
    assert {k for _, labels in scraped for k, _ in labels} <= {"method", "code", "le"}


def test_a_refused_call_names_its_call_id_to_the_client_and_in_the_log(world: World) -> None:
    patient = new_patient()
    world.clerk.access.GrantAccess(
        apb.GrantAccessRequest(patient=patient, principal="metrics-dr"), timeout=TIMEOUT
    )
    record = put_record(world.doctor, patient, b"synthetic note")
    refused = fetch(world.stranger, record.id)
    assert refused.error is not None
    trailers = dict(refused.error.trailing_metadata() or ())
    call = trailers.get(CALL_TRAILER)
    assert call is not None, "no call id in the trailer"
    assert len(call) == 16, call

    def logged() -> list[dict[str, Any]]:
        lines = world.service.log_path.read_text(errors="replace").splitlines()
        entries = [json.loads(line) for line in lines if line.startswith("{")]
        return [e for e in entries if e.get("call") == call]

    wait_for(lambda: bool(logged()), what="a log line with the call id")
    assert {e["msg"] for e in logged()} >= {"rpc failed"}
    # The same id is never handed to two calls.
    again = fetch(world.stranger, record.id)
    assert again.error is not None
    assert dict(again.error.trailing_metadata() or ()).get(CALL_TRAILER) not in (None, call)


def test_token_and_audit_commit_latency_are_measured(world: World) -> None:
    def counts() -> tuple[float, float]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{world.metrics_port}/metrics", timeout=10
        ) as reply:
            families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}

        def count(name: str) -> float:
            return sum(s.value for s in families[name].samples if s.name == f"{name}_count")

        return count("medvault_token_seconds"), count("medvault_audit_commit_seconds")

    token_before, commits_before = counts()
    patient = new_patient()
    world.clerk.access.GrantAccess(
        apb.GrantAccessRequest(patient=patient, principal="metrics-dr"), timeout=TIMEOUT
    )
    record = put_record(world.doctor, patient, b"synthetic note")
    assert fetch(world.doctor, record.id).error is None
    wait_for(lambda: counts()[1] > commits_before, what="the read's event committed")
    token_after, commits_after = counts()
    assert token_after - token_before >= 2, "a put and a get wrap and unwrap a key"
    assert commits_after > commits_before, "the read's event was committed"


def _bytes(scraped: dict[Any, float], name: str, method: str) -> float:
    return scraped.get((name, (("method", method),)), 0.0)


def test_bytes_in_and_out_are_counted_by_method(world: World) -> None:
    patient = new_patient()
    world.clerk.access.GrantAccess(
        apb.GrantAccessRequest(patient=patient, principal="metrics-dr"), timeout=TIMEOUT
    )
    content = b"synthetic bytes " * 20_000  # 320,000 bytes: several chunks each way
    before = _scrape(world.metrics_port)
    record = put_record(world.doctor, patient, content)
    assert fetch(world.doctor, record.id).content == content
    received, sent = "medvault_rpc_received_bytes_total", "medvault_rpc_sent_bytes_total"
    wait_for(lambda: _bytes(_scrape(world.metrics_port), sent, GET)
             - _bytes(before, sent, GET) >= len(content), what="the bytes counted")  # fmt: skip
    after = _scrape(world.metrics_port)
    put_in = _bytes(after, received, PUT) - _bytes(before, received, PUT)
    get_out = _bytes(after, sent, GET) - _bytes(before, sent, GET)
    # The content plus the messages' headers and framing fields, and nothing near twice.
    assert len(content) <= put_in < len(content) + 16_384
    assert len(content) <= get_out < len(content) + 16_384
    assert _bytes(after, sent, PUT) - _bytes(before, sent, PUT) < 16_384
