"""Incident detection and policy reload (SIGHUP) on a running server.

A burst of denials from one source and an unusual read volume by one principal each
raise an "incident" audit event and the Prometheus counter. SIGHUP re-reads the policy
file: a valid change applies to the next call; an invalid file is refused with a log
line naming the problem, and the policy in force stays.

PYTEST_DONT_REWRITE: failures name codes and counts only.
"""

from __future__ import annotations

import os
import re
import signal
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from service._gen.medvault.v1 import access_pb2 as apb
from service._gen.medvault.v1 import audit_pb2 as aupb
from service.guard import source_host
from tests.fixtures.service import DEFAULT_POLICY, RunningService, free_port
from tests.integration.access.helpers import (
    TIMEOUT,
    Client,
    client,
    code_of,
    events,
    fetch,
    grant,
    new_patient,
    put_record,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DENIED_THRESHOLD = 5
READ_THRESHOLD = 5
INCIDENTS = f"""
[incidents]
denied_threshold = {DENIED_THRESHOLD}
denied_window_seconds = 60
read_threshold = {READ_THRESHOLD}
read_window_seconds = 60
"""


def policy_text(default: str) -> str:
    """The default policy with this module's incident thresholds."""
    head, _, _ = default.partition("[incidents]")
    return head + INCIDENTS


@dataclass
class World:
    service: RunningService
    metrics_port: int
    policy_file: Path
    officer: Client
    clerk: Client
    issue: Any


@pytest.fixture(scope="module")
def world(service_factory: Any, fresh_database: str, issue: Any) -> Iterator[World]:
    port = free_port()
    service: RunningService = service_factory(
        fresh_database,
        policy=policy_text(DEFAULT_POLICY.read_text()),
        metrics_listen=f"127.0.0.1:{port}",
    )
    officer = client(service, issue("officer-incidents", "security_officer"))
    clerk = client(service, issue("clerk-incidents", "records_clerk"))
    yield World(service, port, service.config_path.parent / "policy.toml", officer, clerk, issue)
    officer.close()
    clerk.close()
    service.stop()


def metric(w: World, kind: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{w.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    match = re.search(rf'^medvault_incidents_total\{{kind="{kind}"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_denied_burst_raises_an_incident(world: World) -> None:
    intruder = client(world.service, world.issue("backup-incidents", "backup_operator"))
    try:
        for _ in range(DENIED_THRESHOLD + 1):
            got = fetch(intruder, "0" * 32).code
            assert got == grpc.StatusCode.PERMISSION_DENIED, got.name
    finally:
        intruder.close()
    denied = events(world.officer, principal="backup-incidents", outcome=aupb.OUTCOME_DENIED)
    assert len(denied) == DENIED_THRESHOLD + 1, f"{len(denied)} denied events"
    sources = {e.source for e in denied}
    assert len(sources) == 1, "one channel, several sources"
    incidents = [
        e for e in events(world.officer, action="incident") if e.resource == "incident/denied-burst"
    ]
    assert len(incidents) == 1, f"{len(incidents)} denied-burst incidents (one per window)"
    # Keyed by host, without the port: reconnecting must not escape the window.
    assert incidents[0].source == source_host(sources.pop()), "the incident names another source"
    assert incidents[0].reason, "the incident has no description"
    assert metric(world, "denied-burst") >= 1, "metric not raised"
    log = world.service.log_path.read_text(errors="replace")
    assert "security incident" in log, "no warning log line"


def test_read_volume_raises_an_incident(world: World) -> None:
    patient = new_patient()
    record = put_record(world.clerk, patient, b"synthetic volume note")
    grant(world.clerk, patient, "physician-incidents")
    doctor = client(world.service, world.issue("physician-incidents", "physician"))
    try:
        for _ in range(READ_THRESHOLD + 1):
            assert fetch(doctor, record.id).error is None, "read failed"
    finally:
        doctor.close()
    incidents = events(world.officer, principal="physician-incidents", action="incident")
    assert len(incidents) == 1, f"{len(incidents)} read-volume incidents"
    assert incidents[0].resource == "incident/read-volume", incidents[0].resource
    assert metric(world, "read-volume") >= 1, "metric not raised"


def _whoami(w: World, c: Client) -> grpc.StatusCode:
    return code_of(c.access.WhoAmI, apb.WhoAmIRequest(), timeout=TIMEOUT)


def test_sighup_reloads_and_keeps_the_old_policy_when_invalid(world: World) -> None:
    nurse = client(world.service, world.issue("nurse-reload", "nurse"))
    doctor = client(world.service, world.issue("physician-reload", "physician"))
    pid = world.service.process.pid
    original = world.policy_file.read_text()
    try:
        assert _whoami(world, nurse) == grpc.StatusCode.OK, "nurse WhoAmI before reload"

        # Remove a permission: the next call is denied once the reload has run.
        nurse_block = re.compile(
            r"(\[roles\.nurse\][^\[]*?permissions = \[[^\]]*?),\s*"
            r"\"access\.whoami\"",
            re.S,
        )
        changed, count = nurse_block.subn(r"\1", original)
        assert count == 1, "could not edit the nurse role"
        world.policy_file.write_text(changed)
        os.kill(pid, signal.SIGHUP)
        wait_for(
            lambda: _whoami(world, nurse) == grpc.StatusCode.PERMISSION_DENIED,
            timeout=30,
            what="the reloaded policy to deny the nurse",
        )
        assert _whoami(world, doctor) == grpc.StatusCode.OK, "physician lost WhoAmI"

        # Invalid files: refused with the reason in the log; the last good policy stays.
        for broken, problem in (
            (
                changed.replace('"access.whoami"]', '"access.whoami", "records.teleport"]', 1),
                "unknown permission 'records.teleport'",
            ),
            (changed + "\n[roles.nurse\n", "is not valid TOML"),
        ):
            world.policy_file.write_text(broken)
            log_size = world.service.log_path.stat().st_size
            os.kill(pid, signal.SIGHUP)

            def logged(size: int = log_size, text: str = problem) -> bool:
                with world.service.log_path.open("rb") as f:
                    f.seek(size)
                    tail = f.read().decode(errors="replace")
                return "policy reload failed" in tail and text in tail

            wait_for(logged, timeout=30, what=f"the reload failure naming {problem!r}")
            assert _whoami(world, nurse) == grpc.StatusCode.PERMISSION_DENIED, (
                "invalid policy changed the nurse's access"
            )
            assert _whoami(world, doctor) == grpc.StatusCode.OK, "invalid policy broke WhoAmI"
            assert world.service.process.poll() is None, "server died on an invalid policy"

        # A valid file again is taken again.
        world.policy_file.write_text(original)
        os.kill(pid, signal.SIGHUP)
        wait_for(
            lambda: _whoami(world, nurse) == grpc.StatusCode.OK,
            timeout=30,
            what="the restored policy",
        )
    finally:
        world.policy_file.write_text(original)
        nurse.close()
        doctor.close()
