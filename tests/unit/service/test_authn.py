"""Principals: certificate roles, and delegation tokens verified against a JWKS file."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from service.authn import (
    ANONYMOUS,
    AuthenticationError,
    Authenticator,
    DelegationNotAllowedError,
    Principal,
)
from service.authz import PolicyHolder
from service.authz.policy import load
from service.status import status_for

ROOT = Path(__file__).resolve().parents[3]
ISSUER = "https://idp.hospital.example"
AUDIENCE = "medvault"
PEER = "ipv4:10.0.0.7:51234"

POLICY = f"""
[roles.physician]
permissions = ["records.read", "access.whoami"]
patient_scoped = true
[roles.nurse]
permissions = ["records.read"]
patient_scoped = true
[roles.radiologist]
permissions = ["records.read"]
[applications."his-app"]
delegate = true
roles = []
[applications."ris-app"]
delegate = false
roles = ["radiologist"]
[principals."dr-lan"]
roles = ["physician"]
[delegation]
jwks_file = "jwks.json"
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
leeway_seconds = 30
"""


@dataclass(frozen=True)
class Keys:
    """The IdP's signing keys; their public halves are in the policy's JWKS file."""

    ec: ec.EllipticCurvePrivateKey
    rsa: rsa.RSAPrivateKey
    ec_public_pem: bytes


def new_keys() -> Keys:
    """A fresh IdP key pair of each kind (the ``keys`` fixture, tests/unit/service/conftest)."""
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pem = ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Keys(ec_key, rsa.generate_private_key(public_exponent=65537, key_size=2048), pem)


@pytest.fixture
def authenticator(tmp_path: Path, keys: Keys) -> Authenticator:
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(keys.ec.public_key()))
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys.rsa.public_key()))
    ec_jwk.update(kid="ec-1", use="sig")
    rsa_jwk.update(kid="rsa-1")
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [ec_jwk, rsa_jwk]}))
    (tmp_path / "policy.toml").write_text(POLICY)
    return Authenticator(PolicyHolder.load(tmp_path / "policy.toml"))


def _cert_context(cn: str, ou: str | None = None) -> dict[str, list[bytes]]:
    """What gRPC's auth_context reports for a client certificate CN=cn[, OU=ou]."""
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    name = x509.Name(attrs)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    return {"x509_common_name": [cn.encode()], "x509_pem_cert": [pem]}


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER, "aud": AUDIENCE, "sub": "nurse-mai", "iat": now, "azp": "his-app",
        "nbf": now - 5, "exp": now + 300, "roles": ["nurse", "superuser"],
    }  # fmt: skip
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())


def _es256(keys: Keys, kid: str = "ec-1", **overrides: Any) -> str:
    return jwt.encode(_claims(**overrides), keys.ec, algorithm="ES256", headers={"kid": kid})


def _rs256(keys: Keys, kid: str = "rsa-1", **overrides: Any) -> str:
    return jwt.encode(_claims(**overrides), keys.rsa, algorithm="RS256", headers={"kid": kid})


def _tampered_signature(keys: Keys) -> str:
    head, payload, sig = _es256(keys).split(".")
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    return f"{head}.{payload}.{flipped}"


def _tampered_payload(keys: Keys) -> str:
    head, _, sig = _es256(keys).split(".")
    forged = _b64(json.dumps(_claims(roles=["physician"])).encode())
    return f"{head}.{forged}.{sig}"


def _alg_none(_keys: Keys) -> str:
    return _unsigned({"alg": "none", "typ": "JWT", "kid": "ec-1"}, _claims()) + "."


def _hs256_with_public_key(keys: Keys) -> str:
    """The algorithm-confusion forgery: HMAC keyed with the published public key."""
    signing_input = _unsigned({"alg": "HS256", "typ": "JWT", "kid": "ec-1"}, _claims())
    mac = hmac.new(keys.ec_public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def _bearer(token: str) -> list[tuple[str, str | bytes]]:
    return [("user-agent", "grpc-python"), ("authorization", f"Bearer {token}")]


# --- certificates ----------------------------------------------------------------------


def test_no_certificate_is_anonymous(authenticator: Authenticator) -> None:
    principal = authenticator.authenticate({}, [], PEER)
    assert principal == Principal(ANONYMOUS, None, frozenset(), PEER)


def test_certificate_ou_names_role(authenticator: Authenticator) -> None:
    principal = authenticator.authenticate(_cert_context("nurse-hoa", "nurse"), [], PEER)
    assert principal.name == "nurse-hoa"
    assert principal.roles == {"nurse"}
    assert principal.application is None
    assert principal.display == "nurse-hoa"
    assert not principal.delegated


def test_unknown_ou_gives_no_role(authenticator: Authenticator) -> None:
    principal = authenticator.authenticate(_cert_context("someone", "superuser"), [], PEER)
    assert principal.roles == frozenset()


def test_policy_principal_overrides_ou(authenticator: Authenticator) -> None:
    principal = authenticator.authenticate(_cert_context("dr-lan", "nurse"), [], PEER)
    assert principal.roles == {"physician"}


def test_application_roles_not_ou(authenticator: Authenticator) -> None:
    principal = authenticator.authenticate(_cert_context("ris-app", "physician"), [], PEER)
    assert principal.roles == {"radiologist"}


def test_common_name_without_pem(authenticator: Authenticator) -> None:
    principal = authenticator.authenticate({"x509_common_name": [b"his-app"]}, [], PEER)
    assert principal.name == "his-app"
    assert principal.roles == frozenset()


# --- delegation ------------------------------------------------------------------------


@pytest.mark.parametrize("sign", [_es256, _rs256], ids=["ES256", "RS256"])
def test_valid_token_acts_for_user(
    authenticator: Authenticator, keys: Keys, sign: Callable[[Keys], str]
) -> None:
    principal = authenticator.authenticate(_cert_context("his-app"), _bearer(sign(keys)), PEER)
    assert principal.name == "nurse-mai"
    assert principal.application == "his-app"
    assert principal.roles == {"nurse"}  # "superuser" is not a role of the policy
    assert principal.display == "nurse-mai via his-app"
    assert principal.delegated
    assert principal.source == PEER


def test_policy_principal_overrides_token_roles(authenticator: Authenticator, keys: Keys) -> None:
    token = _es256(keys, sub="dr-lan", roles=["nurse"])
    principal = authenticator.authenticate(_cert_context("his-app"), _bearer(token), PEER)
    assert principal.roles == {"physician"}


def test_leeway_accepts_just_expired(authenticator: Authenticator, keys: Keys) -> None:
    token = _es256(keys, exp=int(time.time()) - 10)
    assert authenticator.authenticate(_cert_context("his-app"), _bearer(token), PEER).name


def _expired(keys: Keys) -> str:
    return _es256(keys, exp=int(time.time()) - 120)


def _not_yet_valid(keys: Keys) -> str:
    return _es256(keys, nbf=int(time.time()) + 600)


BAD_TOKENS: list[tuple[str, Callable[[Keys], str], str]] = [
    ("tampered-signature", _tampered_signature, "token signature invalid"),
    ("tampered-payload", _tampered_payload, "token signature invalid"),
    ("expired", _expired, "token expired"),
    ("not-yet-valid", _not_yet_valid, "token not yet valid"),
    ("wrong-audience", lambda k: _es256(k, aud="other-service"), "token audience mismatch"),
    ("wrong-issuer", lambda k: _es256(k, iss="https://evil.example"), "token issuer mismatch"),
    ("alg-none", _alg_none, "token algorithm not allowed"),
    ("hs256-public-key", _hs256_with_public_key, "token algorithm not allowed"),
    ("rs256-with-ec-key", lambda k: _rs256(k, kid="ec-1"), "token algorithm not allowed"),
    ("unknown-kid", lambda k: _es256(k, kid="retired-7"), "token key unknown"),
    ("missing-sub", lambda k: _es256(k, sub=None), "token missing claim sub"),
    ("missing-exp", lambda k: _es256(k, exp=None), "token missing claim exp"),
    ("empty-sub", lambda k: _es256(k, sub=""), "malformed token"),
    ("roles-not-a-list", lambda k: _es256(k, roles="physician"), "malformed token"),
    ("garbage", lambda _k: "not-a-jwt", "malformed token"),
]


@pytest.mark.parametrize(
    ("make", "problem"), [(m, p) for _, m, p in BAD_TOKENS], ids=[n for n, _, _ in BAD_TOKENS]
)
def test_bad_tokens_are_refused(
    authenticator: Authenticator, keys: Keys, make: Callable[[Keys], str], problem: str
) -> None:
    token = make(keys)
    with pytest.raises(AuthenticationError) as info:
        authenticator.authenticate(_cert_context("his-app"), _bearer(token), PEER)
    message = str(info.value)
    assert message.startswith(problem)
    # The message names the problem class only: no token, no subject, no claims.
    assert token not in message
    assert "nurse-mai" not in message
    assert status_for(info.value) == (grpc.StatusCode.UNAUTHENTICATED, message)


@pytest.mark.parametrize("cn", ["ris-app", "dr-lan", "unknown-app"])
def test_application_not_allowed_to_delegate(
    authenticator: Authenticator, keys: Keys, cn: str
) -> None:
    with pytest.raises(DelegationNotAllowedError, match=f"application {cn} is not allowed") as info:
        authenticator.authenticate(_cert_context(cn), _bearer(_es256(keys)), PEER)
    assert status_for(info.value)[0] == grpc.StatusCode.PERMISSION_DENIED


def test_token_without_certificate_is_refused(authenticator: Authenticator, keys: Keys) -> None:
    with pytest.raises(DelegationNotAllowedError, match="application anonymous"):
        authenticator.authenticate({}, _bearer(_es256(keys)), PEER)


def test_delegation_not_configured(keys: Keys) -> None:
    """The default policy names no JWKS file: tokens are refused with a clear reason."""
    authenticator = Authenticator(PolicyHolder(load(ROOT / "deploy" / "policy.toml")))
    with pytest.raises(AuthenticationError, match="delegation is not configured"):
        authenticator.authenticate(_cert_context("local-app"), _bearer(_es256(keys)), PEER)


@pytest.mark.parametrize(
    "metadata",
    [
        [("authorization", "Basic dXNlcjpwYXNz")],
        [("authorization", "Bearer")],
        [("authorization", "Bearer a.b.c"), ("authorization", "Bearer d.e.f")],
        [("authorization", "Bearer " + "a" * (17 << 10))],
    ],
    ids=["basic", "empty", "twice", "too-long"],
)
def test_malformed_authorization_metadata(
    authenticator: Authenticator, metadata: list[tuple[str, str | bytes]]
) -> None:
    with pytest.raises(AuthenticationError, match="malformed"):
        authenticator.authenticate(_cert_context("his-app"), metadata, PEER)
