"""The edge's admission (``AccessGuard.admit`` on the event loop, ``refuse`` in a worker
thread): each credential checked once, every refusal audited once and counted, even when
the call ends while its audit job waits for a thread."""

from __future__ import annotations

import asyncio
import base64
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from service.authn import AuthenticationError, Authenticator
from service.authz import PermissionDeniedError, PolicyHolder
from service.edge import Deadlines, EdgeInterceptor
from service.guard import AccessGuard, Call, CallFacts, Refusal
from service.limits import CallLimiter
from storage import AuditEntry
from tests.unit.service.test_authn import (  # keys: the module's fixture, shared
    PEER,
    POLICY,
    Keys,
    _bearer,
    _cert_context,
    _es256,
)
from tests.unit.service.test_authn_identity import _write_policy

PUT = "/medvault.v1.RecordService/PutRecord"  # records.write: not a nurse's


class _Trail:
    """Collects the events the guard writes (a refusal commits exactly one)."""

    def __init__(self) -> None:
        self.entries: list[AuditEntry] = []

    def record(self, entry: AuditEntry) -> None:
        self.entries.append(entry)


class _Incidents:
    def __init__(self) -> None:
        self.sources: list[str] = []

    def denied(self, source: str) -> None:
        self.sources.append(source)


def _guard(tmp_path: Path, keys: Keys) -> tuple[AccessGuard, _Trail, _Incidents]:
    _write_policy(tmp_path, keys, POLICY + "replay_cache = true\n")
    holder = PolicyHolder.load(tmp_path / "policy.toml")
    trail, incidents = _Trail(), _Incidents()
    guard = AccessGuard(holder, Authenticator(holder), None, trail, incidents)  # type: ignore[arg-type]
    return guard, trail, incidents


def test_denied_delegated_call_is_audited_as_denied_not_as_a_replay(
    tmp_path: Path, keys: Keys
) -> None:
    """The edge admits on the event loop and audits a refusal in a worker thread; the
    refusal carries the decision, so the one-time token is not offered to the replay
    cache twice (which would have turned a policy denial into "token replayed")."""
    guard, trail, incidents = _guard(tmp_path, keys)
    facts = CallFacts(
        "/medvault.v1.RecordService/PutRecord",  # records.write: not a nurse's
        _cert_context("his-app"), _bearer(_es256(keys, jti="t-deny")), PEER,
    )  # fmt: skip
    admitted = guard.admit(facts)
    assert isinstance(admitted, Refusal)
    assert admitted.error is None
    assert admitted.call is not None
    assert trail.entries == []  # admit itself writes nothing
    with pytest.raises(PermissionDeniedError):
        guard.refuse(admitted)
    assert [(e.principal, e.outcome, e.status) for e in trail.entries] == [
        ("nurse-mai", "denied", "PERMISSION_DENIED")
    ]
    assert len(incidents.sources) == 1
    # The same token again is a replay: it was admitted once, by admit.
    with pytest.raises(AuthenticationError, match="token replayed"):
        guard.enter(facts)
    assert trail.entries[-1].status == "UNAUTHENTICATED"


def test_failed_authentication_is_refused_with_its_own_error(tmp_path: Path, keys: Keys) -> None:
    guard, trail, _ = _guard(tmp_path, keys)
    facts = CallFacts(
        "/medvault.v1.RecordService/GetRecord", _cert_context("his-app"),
        _bearer("not-a-token"), PEER,
    )  # fmt: skip
    admitted = guard.admit(facts)
    assert isinstance(admitted, Refusal)
    assert admitted.call is None
    assert isinstance(admitted.error, AuthenticationError)
    with pytest.raises(AuthenticationError) as raised:
        guard.refuse(admitted)
    assert raised.value is admitted.error
    assert [(e.principal, e.application, e.status) for e in trail.entries] == [
        ("unauthenticated", "his-app", "UNAUTHENTICATED")
    ]


def test_allowed_call_is_admitted_without_an_event(tmp_path: Path, keys: Keys) -> None:
    guard, trail, incidents = _guard(tmp_path, keys)
    facts = CallFacts(
        "/medvault.v1.RecordService/GetRecord", _cert_context("his-app"),
        _bearer(_es256(keys, jti="t-ok")), PEER,
    )  # fmt: skip
    admitted = guard.admit(facts)
    assert isinstance(admitted, Call)
    assert admitted.principal.name == "nurse-mai"
    assert admitted.decision.allowed
    assert trail.entries == []
    assert incidents.sources == []


# --- through the edge's entry (service.edge), with grpc's context stood in for ----------


class _AbortedError(Exception):
    pass


class _Context:
    """As much of grpc's servicer context as the edge's entry reads."""

    def __init__(self, token: str) -> None:
        self._auth = _cert_context("his-app")
        self._metadata = _bearer(token)
        self.aborted: list[grpc.StatusCode] = []

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return PEER

    def time_remaining(self) -> float:
        return 30.0

    async def abort(self, code: grpc.StatusCode, _message: str) -> None:
        self.aborted.append(code)
        raise _AbortedError


def _edge(guard: AccessGuard) -> EdgeInterceptor:
    return EdgeInterceptor(guard, CallLimiter(4, 4, 60, lambda _: None), Deadlines(5, 5))


async def _enter(edge: EdgeInterceptor, context: _Context) -> None:
    async with edge._entered(context, PUT):  # type: ignore[arg-type]
        raise AssertionError("a refused call reached its handler")


@pytest.mark.parametrize("case", ["policy-denial", "bad-token"])
def test_the_edge_audits_a_refusal_once_and_answers_its_status(
    tmp_path: Path, keys: Keys, case: str
) -> None:
    guard, trail, incidents = _guard(tmp_path, keys)
    token = _es256(keys, jti="t-edge") if case == "policy-denial" else "not-a-token"
    context = _Context(token)
    with pytest.raises(_AbortedError):
        asyncio.run(_enter(_edge(guard), context))
    expected = {
        "policy-denial": ("nurse-mai", grpc.StatusCode.PERMISSION_DENIED),
        "bad-token": ("unauthenticated", grpc.StatusCode.UNAUTHENTICATED),
    }[case]
    assert [(e.principal, e.status) for e in trail.entries] == [(expected[0], expected[1].name)]
    assert context.aborted == [expected[1]]
    assert incidents.sources == ["ipv4:10.0.0.7"]


@pytest.mark.parametrize("case", ["policy-denial", "bad-token"])
def test_a_refusal_is_audited_when_the_call_ends_before_a_thread_is_free(
    tmp_path: Path, keys: Keys, case: str
) -> None:
    """``admit`` decides on the loop (and spends a one-time token there); the refusal's
    event must follow even when the client cancels, or its short deadline passes, while
    the audit job still waits for a worker thread (a busy pool): otherwise a caller could
    probe with tiny deadlines and leave no event and no count toward an incident."""
    guard, trail, incidents = _guard(tmp_path, keys)
    token = _es256(keys, jti="t-cancel") if case == "policy-denial" else "not-a-token"
    context = _Context(token)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(1))
        release = threading.Event()
        busy = loop.run_in_executor(None, release.wait, 30)  # the only worker is busy
        call = asyncio.create_task(_enter(_edge(guard), context))
        for _ in range(20):  # admitted on the loop; its audit job queued for a thread
            await asyncio.sleep(0)
        assert not call.done()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        release.set()
        await busy
        # Whatever the edge left running (the detached audit job) ends before we look.
        others = asyncio.all_tasks() - {asyncio.current_task()}
        await asyncio.gather(*others, return_exceptions=True)
        await loop.run_in_executor(None, lambda: None)  # jobs queued before this one ran

    asyncio.run(scenario())
    statuses = [e.status for e in trail.entries]
    assert statuses == ["PERMISSION_DENIED" if case == "policy-denial" else "UNAUTHENTICATED"]
    assert incidents.sources == ["ipv4:10.0.0.7"]
    assert context.aborted == []  # the client had gone: nothing to answer


def _segment(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_HOSTILE_TOKENS = {
    "deeply-nested-header": _segment(b"[" * 6000 + b"]" * 6000) + ".e30.c2ln",
    "header-not-an-object": _segment(b'"ES256"') + ".e30.c2ln",
    "crit-not-a-list": _segment(b'{"alg":"ES256","kid":"ec-1","crit":{"a":1}}') + ".e30.c2ln",
    "unencoded-payload": _segment(b'{"alg":"ES256","kid":"ec-1","b64":false,"crit":["b64"]}')
    + ".e30.c2ln",
    "kid-not-a-string": _segment(b'{"alg":"ES256","kid":{"a":1}}') + ".e30.c2ln",
    "alg-not-a-string": _segment(b'{"alg":["ES256"],"kid":"ec-1"}') + ".e30.c2ln",
    "latin-1-characters": "\u00e9" * 40 + ".e30.c2ln",
    "four-segments": "e30.e30.c2ln.c2ln",
    "over-16-kib": "a" * (16 << 10) + ".e30.c2ln",
}


@pytest.mark.parametrize("case", sorted(_HOSTILE_TOKENS))
def test_hostile_tokens_are_audited_refusals_not_errors(
    tmp_path: Path, keys: Keys, case: str
) -> None:
    """``admit`` runs on the event loop and catches only the authentication errors: any
    other exception a token could raise would end the call INTERNAL with no event."""
    guard, trail, incidents = _guard(tmp_path, keys)
    facts = CallFacts(PUT, _cert_context("his-app"), _bearer(_HOSTILE_TOKENS[case]), PEER)
    admitted = guard.admit(facts)
    assert isinstance(admitted, Refusal)
    assert isinstance(admitted.error, AuthenticationError)
    with pytest.raises(AuthenticationError):
        guard.refuse(admitted)
    assert [e.status for e in trail.entries] == ["UNAUTHENTICATED"]
    assert len(incidents.sources) == 1
