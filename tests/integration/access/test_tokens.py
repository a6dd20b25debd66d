"""Delegation tokens against a running server: what is accepted, what is refused, audited.

An EMR application (certificate CN "his-app", delegate = true) acts for a user with a
JWT signed by the hospital IdP, whose public keys the policy's JWKS file holds. Every
refusal is UNAUTHENTICATED (bad token) or PERMISSION_DENIED (application may not
delegate), and a denied event at the caller's address.

PYTEST_DONT_REWRITE: failures name codes and reasons, never tokens.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from service._gen.medvault.v1 import access_pb2 as apb
from service._gen.medvault.v1 import audit_pb2 as aupb
from tests.fixtures.service import DEFAULT_POLICY, RunningService
from tests.integration.access.helpers import (
    TIMEOUT,
    Client,
    client,
    events,
    fetch,
    grant,
    new_patient,
    put_record,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ISSUER = "https://idp.hospital.test"
AUDIENCE = "medvault-test"
USER = "dr-token-1"
WHOAMI = "/medvault.v1.AccessService/WhoAmI"
HOSTILE_SUBJECTS = {
    "via-subject": "dr-x via his-app",
    "application-subject": "lis-app",
    "application-subject-case": "LIS-App",
}


@dataclass
class World:
    service: RunningService
    ec_key: ec.EllipticCurvePrivateKey
    rsa_key: rsa.RSAPrivateKey
    his: tuple[Path, Path]
    lis: tuple[Path, Path]
    clerk: Client
    officer: Client


@pytest.fixture(scope="module")
def world(
    service_factory: Any, fresh_database: str, issue: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    ec_jwk.update(kid="ec-test", use="sig", alg="ES256")
    rsa_jwk.update(kid="rsa-test", use="sig", alg="RS256")
    jwks = tmp_path_factory.mktemp("jwks") / "jwks.json"
    jwks.write_text(json.dumps({"keys": [ec_jwk, rsa_jwk]}))
    policy = (
        DEFAULT_POLICY.read_text()
        + f"""
[applications."his-app"]
delegate = true
roles = []

[applications."lis-app"]
delegate = false
roles = []

[delegation]
jwks_file = "{jwks}"
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
leeway_seconds = 5
"""
    )
    service: RunningService = service_factory(fresh_database, policy=policy)
    clerk = client(service, issue("clerk-tokens", "records_clerk"))
    officer = client(service, issue("officer-tokens", "security_officer"))
    yield World(service, ec_key, rsa_key, issue("his-app"), issue("lis-app"), clerk, officer)
    clerk.close()
    officer.close()
    service.stop()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER, "aud": AUDIENCE, "sub": USER, "iat": now, "nbf": now - 5, "azp": "his-app",
        "exp": now + 300, "roles": ["physician"],
    }  # fmt: skip
    base.update(overrides)
    return base


def es256(w: World, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), w.ec_key, algorithm="ES256", headers={"kid": "ec-test"})


def rs256(w: World, **overrides: Any) -> str:
    return jwt.encode(
        claims(**overrides), w.rsa_key, algorithm="RS256", headers={"kid": "rsa-test"}
    )


def tampered(w: World) -> str:
    head, payload, sig = es256(w).split(".")
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    return f"{head}.{payload}.{flipped}"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def local_ports(server_port: int) -> set[int]:
    """Local ports of this process's TCP connections to the server."""
    return {
        c.laddr.port
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == server_port and c.status == psutil.CONN_ESTABLISHED
    }


def whoami(
    w: World, cert: tuple[Path, Path], token: str
) -> tuple[Any, grpc.RpcError | None, set[int]]:
    """WhoAmI on a fresh channel; the reply or error and the channel's local ports."""
    before = local_ports(w.service.port)
    with w.service.channel(*cert) as channel:
        stub = Client("", channel).access
        try:
            reply = stub.WhoAmI(apb.WhoAmIRequest(), metadata=bearer(token), timeout=TIMEOUT)
            error = None
        except grpc.RpcError as e:
            reply, error = None, e
        ports = local_ports(w.service.port) - before
    return reply, error, ports


def test_valid_tokens_act_for_the_user(world: World) -> None:
    for token in (es256(world), rs256(world)):
        reply, error, _ = whoami(world, world.his, token)
        assert error is None, f"valid token refused: {error.code().name if error else ''}"
        assert reply.principal == USER, "principal is not the token subject"
        assert reply.application == "his-app", "application not named"
        assert list(reply.roles) == ["physician"], "roles not taken from the token"
        assert "records.read" in reply.permissions, "physician permissions missing"


@pytest.mark.parametrize(
    ("case", "code", "reason"),
    [
        ("tampered-signature", grpc.StatusCode.UNAUTHENTICATED, "token signature invalid"),
        ("expired", grpc.StatusCode.UNAUTHENTICATED, "token expired"),
        ("wrong-audience", grpc.StatusCode.UNAUTHENTICATED, "token audience mismatch"),
        ("wrong-issuer", grpc.StatusCode.UNAUTHENTICATED, "token issuer mismatch"),
        ("not-yet-valid", grpc.StatusCode.UNAUTHENTICATED, "token not yet valid"),
        ("unknown-kid", grpc.StatusCode.UNAUTHENTICATED, "token key unknown"),
        ("no-delegation", grpc.StatusCode.PERMISSION_DENIED, "not allowed to act for users"),
        ("other-azp", grpc.StatusCode.UNAUTHENTICATED, "issued to another application"),
        ("no-azp", grpc.StatusCode.UNAUTHENTICATED, "token missing claim azp"),
        ("via-subject", grpc.StatusCode.UNAUTHENTICATED, "malformed token: sub"),
        # A user named like an application would act as it (its grants, its call share).
        ("application-subject", grpc.StatusCode.UNAUTHENTICATED, "names an application"),
        ("application-subject-case", grpc.StatusCode.UNAUTHENTICATED, "names an application"),
    ],
)
def test_bad_token_is_refused_and_audited(
    world: World, case: str, code: grpc.StatusCode, reason: str
) -> None:
    now = int(time.time())
    cert = world.his
    match case:
        case "tampered-signature":
            token = tampered(world)
        case "expired":
            token = es256(world, iat=now - 7200, nbf=now - 7200, exp=now - 3600)
        case "wrong-audience":
            token = es256(world, aud="another-service")
        case "wrong-issuer":
            token = rs256(world, iss="https://evil.test")
        case "not-yet-valid":
            token = es256(world, nbf=now + 3600, exp=now + 7200)
        case "unknown-kid":
            token = jwt.encode(
                claims(), world.ec_key, algorithm="ES256", headers={"kid": "ec-other"}
            )
        case "other-azp":  # a token the IdP issued to lis-app, replayed by his-app
            token = es256(world, azp="lis-app")
        case "no-azp":
            token = jwt.encode(
                {k: v for k, v in claims().items() if k != "azp"}, world.ec_key,
                algorithm="ES256", headers={"kid": "ec-test"},
            )  # fmt: skip
        case "via-subject" | "application-subject" | "application-subject-case":
            token = es256(world, sub=HOSTILE_SUBJECTS[case])
        case _:
            token, cert = es256(world), world.lis
    _, error, ports = whoami(world, cert, token)
    assert error is not None, f"{case}: accepted"
    assert error.code() == code, f"{case}: expected {code.name}, got {error.code().name}"
    assert reason in (error.details() or ""), f"{case}: details do not say {reason!r}"
    assert ports, "no connection seen"

    denied = events(world.officer, principal="unauthenticated", outcome=aupb.OUTCOME_DENIED)
    sources = {f"ipv4:127.0.0.1:{p}" for p in ports}
    mine = [e for e in denied if e.source in sources]
    assert len(mine) == 1, f"{case}: {len(mine)} denied events from the caller's address"
    event = mine[0]
    assert event.status == code.name, f"{case}: event status {event.status}"
    assert event.resource == WHOAMI, f"{case}: event resource {event.resource}"
    assert event.action == WHOAMI, f"{case}: event action {event.action}"
    assert reason in event.reason, f"{case}: event reason does not say {reason!r}"
    assert token not in event.reason, f"{case}: token leaked into the audit trail"


def test_delegated_reads_name_user_and_application(world: World) -> None:
    mine, theirs = new_patient(), new_patient()
    record = put_record(world.clerk, mine, b"synthetic delegated note")
    other = put_record(world.clerk, theirs, b"synthetic other note")
    grant(world.clerk, mine, USER)
    with world.service.channel(*world.his) as channel:
        app = Client("his-app", channel)
        token = bearer(es256(world))
        ok = fetch(app, record.id, token)
        assert ok.error is None, f"delegated read failed: {ok.code.name}"
        assert ok.content == b"synthetic delegated note", "content differs"
        refused = fetch(app, other.id, token)
        assert refused.code == grpc.StatusCode.PERMISSION_DENIED, refused.code.name
        assert refused.metadata is None, "metadata sent on refusal"
        assert not refused.content, "content sent on refusal"
        # Without a token the application acts for itself: no roles, nothing allowed.
        alone = fetch(app, record.id)
        assert alone.code == grpc.StatusCode.PERMISSION_DENIED, alone.code.name

    reads = events(world.officer, principal=USER, action="records.read")
    assert [e.outcome for e in reads] == [aupb.OUTCOME_ALLOWED, aupb.OUTCOME_DENIED], (
        "expected one allowed and one denied read"
    )
    for e in reads:
        assert e.application == "his-app", "application missing from the event"
        assert e.role == "physician", f"role {e.role}"
    assert reads[0].resource == f"record/{record.id}/v{record.version}", "resource wrong"
    app_itself = events(world.officer, principal="his-app", outcome=aupb.OUTCOME_DENIED)
    assert len(app_itself) == 1, f"{len(app_itself)} denied events of the application itself"
    assert app_itself[0].application == "", "self-call names an application"


def test_token_roles_unknown_to_policy_grant_nothing(world: World) -> None:
    _, error, _ = whoami(world, world.his, es256(world, sub="someone-2", roles=["superuser"]))
    # No known role: not even access.whoami.
    assert error is not None, "a token with only unknown roles was given access"
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.code().name
