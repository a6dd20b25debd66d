"""The access and audit commands against in-process fake servicers (no real stack).

The fakes record the requests and return canned replies, so these tests check what the
commands send and print; the servicers themselves are tested end to end elsewhere.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from service._gen.medvault.v1 import access_pb2, access_pb2_grpc
from service._gen.medvault.v1 import audit_pb2 as pb
from service._gen.medvault.v1 import audit_pb2_grpc as pb_grpc
from service.cli.main import main

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _event(sequence: int, **fields: Any) -> pb.AuditEvent:
    values: dict[str, Any] = {
        "sequence": sequence, "principal": "dr-a", "application": "his", "role": "physician",
        "action": "records.read", "resource": f"record/r-{sequence}",
        "outcome": pb.OUTCOME_ALLOWED, "patient_index": "ab" * 32, "source": "ipv4:10.0.0.7:1",
    }  # fmt: skip
    values.update(fields)
    msg = pb.AuditEvent(**values)
    msg.time.FromDatetime(T0)
    return msg


class FakeAudit(pb_grpc.AuditServiceServicer):  # type: ignore[misc]  # untyped stub
    """Canned audit replies; remembers the last request."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.events = [
            _event(1), _event(2, principal="dr-b", application=""),
            _event(3, outcome=pb.OUTCOME_DENIED, status="PERMISSION_DENIED",
                   reason="no grant\x1b[2J"),
        ]  # fmt: skip
        self.verify = pb.VerifyChainResponse(
            ok=True, events_checked=3, checkpoints_checked=1, last_checkpoint_sequence=2
        )

    def QueryEvents(self, request: Any, context: Any) -> Iterator[pb.AuditEvent]:  # noqa: N802
        self.requests.append(request)
        yield from self.events

    def VerifyChain(self, request: Any, context: Any) -> pb.VerifyChainResponse:  # noqa: N802
        return self.verify

    def ExportEvents(self, request: Any, context: Any) -> Iterator[pb.ExportChunk]:  # noqa: N802
        self.requests.append(request)
        yield pb.ExportChunk(data=b'{"sequence":1}\n')
        yield pb.ExportChunk(data=b'{"sequence":2}\n')

    def ListBreakGlass(self, request: Any, context: Any) -> pb.ListBreakGlassResponse:  # noqa: N802
        self.requests.append(request)
        item = pb.BreakGlassReviewItem(grant_id="g-9", event=_event(4, reason="ED, unconscious"))
        return pb.ListBreakGlassResponse(items=[item])

    def ReviewBreakGlass(self, request: Any, context: Any) -> pb.BreakGlassReviewItem:  # noqa: N802
        self.requests.append(request)
        item = pb.BreakGlassReviewItem(grant_id=request.grant_id, reviewed=True,
                                       reviewed_by="so-1", comment=request.comment)
        item.reviewed_at.FromDatetime(T0)
        return item


class FakeAccess(access_pb2_grpc.AccessServiceServicer):  # type: ignore[misc]  # untyped stub
    """Canned access replies; remembers the last request."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def GrantAccess(self, request: Any, context: Any) -> access_pb2.Grant:  # noqa: N802
        self.requests.append(request)
        return access_pb2.Grant(id="g-1", principal=request.principal,
                                expires_at=request.expires_at)

    def BreakGlass(self, request: Any, context: Any) -> access_pb2.Grant:  # noqa: N802
        self.requests.append(request)
        grant = access_pb2.Grant(id="g-2", principal="dr-a", break_glass=True)
        grant.expires_at.FromDatetime(datetime(2999, 1, 1, tzinfo=UTC))
        return grant

    def WhoAmI(self, request: Any, context: Any) -> access_pb2.WhoAmIResponse:  # noqa: N802
        return access_pb2.WhoAmIResponse(principal="dr-a", application="his",
                                         roles=["physician"], permissions=["records.read"])

    def RevokeAccess(self, request: Any, context: Any) -> access_pb2.Grant:  # noqa: N802
        context.abort(grpc.StatusCode.NOT_FOUND, "no such grant")
        raise AssertionError  # abort raises


@pytest.fixture
def fakes() -> Iterator[tuple[str, FakeAudit, FakeAccess]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    audit, access = FakeAudit(), FakeAccess()
    pb_grpc.add_AuditServiceServicer_to_server(audit, server)
    access_pb2_grpc.add_AccessServiceServicer_to_server(access, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", audit, access
    server.stop(None)


def run(endpoint: str, *argv: str) -> int:
    return main([*argv, "--insecure", "--endpoint", endpoint])


def test_query_prints_a_safe_table(fakes: Any, capsys: pytest.CaptureFixture[str]) -> None:
    endpoint, audit, _ = fakes
    assert run(endpoint, "audit", "query", "--action", "records.read") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["SEQ", "TIME", "PRINCIPAL", "ROLE", "ACTION", "RESOURCE",
                              "OUTCOME", "REASON"]
    assert "dr-a via his" in out[2]
    assert "denied/PERMISSION_DENIED" in out[4]
    assert "\x1b" not in "".join(out)
    assert audit.requests[-1].action == "records.read"


def test_verify_ok_and_failed(fakes: Any, capsys: pytest.CaptureFixture[str]) -> None:
    endpoint, audit, _ = fakes
    assert run(endpoint, "audit", "verify") == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: 3 events, 1 checkpoint verified; last checkpoint at sequence 2")
    assert "1 event after the last checkpoint" in out
    audit.verify = pb.VerifyChainResponse(ok=False, first_bad_sequence=7, reason="event altered",
                                          events_checked=7)
    assert run(endpoint, "audit", "verify") == 1
    assert "FAILED at sequence 7: event altered" in capsys.readouterr().out


def test_export_writes_a_private_file(fakes: Any, tmp_path: Path) -> None:
    endpoint, audit, _ = fakes
    target = tmp_path / "audit.jsonl"
    assert run(endpoint, "audit", "export", "--format", "jsonl", "-o", str(target)) == 0
    assert target.read_bytes() == b'{"sequence":1}\n{"sequence":2}\n'
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert not (tmp_path / "audit.jsonl.partial").exists()
    assert audit.requests[-1].format == pb.EXPORT_FORMAT_JSONL
    assert audit.requests[-1].query.limit == 0


def test_review_list_and_mark(fakes: Any, capsys: pytest.CaptureFixture[str]) -> None:
    endpoint, audit, _ = fakes
    assert run(endpoint, "audit", "review") == 0
    out = capsys.readouterr().out
    assert "g-9" in out
    assert "abababababab" in out  # the index prefix, not the whole index
    assert "ab" * 32 not in out
    assert audit.requests[-1].include_reviewed is False
    assert run(endpoint, "audit", "review", "g-9", "--comment", " ok ") == 0
    assert "grant g-9 reviewed by so-1" in capsys.readouterr().out
    assert audit.requests[-1].comment == "ok"
    with pytest.raises(SystemExit, match="--comment"):
        run(endpoint, "audit", "review", "g-9")


def test_reports(fakes: Any, capsys: pytest.CaptureFixture[str]) -> None:
    endpoint, audit, _ = fakes
    assert run(endpoint, "audit", "disclosure", "--patient", "P1", "--authority", "H") == 0
    out = capsys.readouterr().out
    assert audit.requests[-1].patient.id == "P1"
    assert audit.requests[-1].outcome == pb.OUTCOME_ALLOWED
    assert "P1" not in out
    assert run(endpoint, "audit", "denied") == 0
    assert audit.requests[-1].outcome == pb.OUTCOME_DENIED
    denied = capsys.readouterr().out.splitlines()
    assert denied[2].split()[:4] == ["1", "dr-a", "via", "his"]  # the fake ignores filters
    assert run(endpoint, "audit", "top-readers", "--limit", "1") == 0
    assert audit.requests[-1].limit == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["PRINCIPAL", "READS", "PATIENTS", "LAST", "READ"]
    assert len(lines) == 3  # header, rule, one reader


def test_access_commands(fakes: Any, capsys: pytest.CaptureFixture[str]) -> None:
    endpoint, _, access = fakes
    assert run(endpoint, "access", "grant", "--patient", "P1", "--authority", "H",
               "--to", "dr-b", "--for", "2") == 0
    assert access.requests[-1].HasField("expires_at")
    assert "created grant g-1 for dr-b" in capsys.readouterr().out
    assert run(endpoint, "access", "break-glass", "--patient", "P1", "--authority", "H",
               "--reason", "ED", "--minutes", "30") == 0
    assert access.requests[-1].duration_seconds == 1800
    assert "opened break-the-glass grant g-2" in capsys.readouterr().out
    assert run(endpoint, "whoami") == 0
    assert "roles:       physician" in capsys.readouterr().out
    assert run(endpoint, "access", "revoke", "g-x") == 1
    assert "NOT_FOUND: no such grant" in capsys.readouterr().err
