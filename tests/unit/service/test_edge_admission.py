"""The edge's admission (``AccessGuard.admit`` on the event loop, ``refuse`` in a worker
thread): each credential checked once, every refusal audited once and counted."""

from __future__ import annotations

import json
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from service.authn import AuthenticationError, Authenticator
from service.authz import PermissionDeniedError, PolicyHolder
from service.guard import AccessGuard, Call, CallFacts, Refusal
from storage import AuditEntry
from tests.unit.service.test_authn import PEER, POLICY, Keys, _bearer, _cert_context, _es256


@pytest.fixture(scope="module")
def keys() -> Keys:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pem = ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Keys(ec_key, rsa.generate_private_key(public_exponent=65537, key_size=2048), pem)


def _write_policy(tmp_path: Path, keys: Keys, text: str) -> None:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(keys.ec.public_key()))
    jwk.update(kid="ec-1", use="sig")
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    (tmp_path / "policy.toml").write_text(text)


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
