"""Identity details: tokens bound to their application, one-time tokens, hostile names,
revoked certificates."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from service.authn import AuthenticationError, Authenticator
from service.authz import PolicyError, PolicyHolder
from service.replay import ReplayCache, ReplayError
from service.revocation import RevocationError, RevocationList, load_crl
from service.status import status_for
from tests.unit.service.test_authn import (  # keys: the module's fixture, shared
    PEER,
    POLICY,
    Keys,
    _bearer,
    _cert_context,
    _es256,
)


@pytest.fixture
def authenticator(tmp_path: Path, keys: Keys) -> Authenticator:
    _write_policy(tmp_path, keys, POLICY)
    return Authenticator(PolicyHolder.load(tmp_path / "policy.toml"))


# --- azp: the token names the application presenting it -------------------------------


def test_token_without_azp_is_refused(authenticator: Authenticator, keys: Keys) -> None:
    with pytest.raises(AuthenticationError, match="token missing claim azp"):
        authenticator.authenticate(_cert_context("his-app"), _bearer(_es256(keys, azp=None)), PEER)


def test_token_of_another_application_is_refused(authenticator: Authenticator, keys: Keys) -> None:
    token = _es256(keys, azp="lis-app")
    with pytest.raises(AuthenticationError, match="issued to another application") as info:
        authenticator.authenticate(_cert_context("his-app"), _bearer(token), PEER)
    assert "lis-app" not in str(info.value)  # the claim is not echoed
    assert status_for(info.value)[0] == grpc.StatusCode.UNAUTHENTICATED


def test_client_id_names_the_expected_azp(tmp_path: Path, keys: Keys) -> None:
    _write_policy(
        tmp_path,
        keys,
        POLICY.replace(
            '[applications."his-app"]\ndelegate = true',
            '[applications."his-app"]\ndelegate = true\nclient_id = "his-frontend"',
        ),
    )
    auth = Authenticator(PolicyHolder.load(tmp_path / "policy.toml"))
    ok = auth.authenticate(
        _cert_context("his-app"), _bearer(_es256(keys, azp="his-frontend")), PEER
    )
    assert ok.application == "his-app"
    with pytest.raises(AuthenticationError, match="another application"):
        auth.authenticate(_cert_context("his-app"), _bearer(_es256(keys)), PEER)


# --- jti: one-time tokens when the policy asks for them --------------------------------


def _write_policy(tmp_path: Path, keys: Keys, text: str) -> None:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(keys.ec.public_key()))
    jwk.update(kid="ec-1", use="sig")
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    (tmp_path / "policy.toml").write_text(text)


def _replay_authenticator(tmp_path: Path, keys: Keys, size: int = 100) -> Authenticator:
    _write_policy(tmp_path, keys, POLICY + f"replay_cache = true\nreplay_cache_size = {size}\n")
    return Authenticator(PolicyHolder.load(tmp_path / "policy.toml"))


def test_replayed_jti_is_refused(tmp_path: Path, keys: Keys) -> None:
    auth = _replay_authenticator(tmp_path, keys)
    token = _es256(keys, jti="t-1")
    assert auth.authenticate(_cert_context("his-app"), _bearer(token), PEER).name == "nurse-mai"
    with pytest.raises(AuthenticationError, match="token replayed"):
        auth.authenticate(_cert_context("his-app"), _bearer(token), PEER)
    # A fresh token of the same user is fine.
    auth.authenticate(_cert_context("his-app"), _bearer(_es256(keys, jti="t-2")), PEER)


def test_replay_cache_requires_jti(tmp_path: Path, keys: Keys) -> None:
    auth = _replay_authenticator(tmp_path, keys)
    with pytest.raises(AuthenticationError, match="missing claim jti"):
        auth.authenticate(_cert_context("his-app"), _bearer(_es256(keys)), PEER)


def test_without_replay_cache_a_token_is_reused(authenticator: Authenticator, keys: Keys) -> None:
    token = _es256(keys, jti="t-1")
    for _ in range(2):
        authenticator.authenticate(_cert_context("his-app"), _bearer(token), PEER)


def test_replay_cache_forgets_expired_tokens_and_stays_bounded() -> None:
    now = [1000.0]
    cache = ReplayCache(clock=lambda: now[0])
    for i in range(3):
        cache.admit({"jti": f"j{i}", "exp": 1010}, capacity=3, leeway=5)
    with pytest.raises(ReplayError, match="full"):
        cache.admit({"jti": "j3", "exp": 1010}, capacity=3, leeway=5)
    with pytest.raises(ReplayError, match="replayed"):
        cache.admit({"jti": "j0", "exp": 1010}, capacity=3, leeway=5)
    now[0] = 1015.0  # exp + leeway: the old tokens can no longer verify, so forget them
    cache.admit({"jti": "j3", "exp": 1100}, capacity=3, leeway=5)
    assert len(cache) == 1


# --- names that could forge an identity ----------------------------------------------

BAD_NAMES = [
    ("nul", "dr-lan\x00admin"),
    ("newline", "dr-lan\nforged line"),
    ("escape", "dr-lan\x1b[2J"),
    ("line-separator", "dr-lan\u2028x"),
    ("via", "dr-lan via his-app"),
    ("via-upper", "dr-lan VIA his-app"),
    ("too-long", "a" * 129),
    ("reserved", "unauthenticated"),
]


@pytest.mark.parametrize("name", [n for _, n in BAD_NAMES], ids=[i for i, _ in BAD_NAMES])
def test_bad_certificate_names_are_refused(authenticator: Authenticator, name: str) -> None:
    # x509 refuses to build a CN over 64 characters; gRPC may still report one.
    context = _cert_context(name) if len(name) <= 64 else {"x509_common_name": [name.encode()]}
    with pytest.raises(AuthenticationError, match="common name") as info:
        authenticator.authenticate(context, [], PEER)
    assert name not in str(info.value)
    assert str(info.value).isprintable()


@pytest.mark.parametrize("name", [n for _, n in BAD_NAMES], ids=[i for i, _ in BAD_NAMES])
def test_bad_token_subjects_are_refused(
    authenticator: Authenticator, keys: Keys, name: str
) -> None:
    token = _es256(keys, sub=name)
    with pytest.raises(AuthenticationError, match="malformed token: sub") as info:
        authenticator.authenticate(_cert_context("his-app"), _bearer(token), PEER)
    assert name not in str(info.value)


def test_common_name_without_pem_is_checked_too(authenticator: Authenticator) -> None:
    with pytest.raises(AuthenticationError, match="common name"):
        authenticator.authenticate({"x509_common_name": [b"x via y"]}, [], PEER)


# --- certificate revocation ------------------------------------------------------------


def _ca(tmp_path: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    path = tmp_path / "ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def _crl(
    key: ec.EllipticCurvePrivateKey, issuer: x509.Name, serials: list[int], der: bool = False
) -> bytes:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder().issuer_name(issuer)
        .last_update(now).next_update(now + dt.timedelta(days=1))
    )  # fmt: skip
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    crl = builder.sign(key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM)


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, cn: str
) -> dict[str, list[bytes]]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    return {"x509_pem_cert": [cert.public_bytes(serialization.Encoding.PEM)]}


@pytest.mark.parametrize("der", [False, True], ids=["pem", "der"])
def test_revoked_certificate_is_refused_after_reload(
    tmp_path: Path, authenticator: Authenticator, der: bool
) -> None:
    ca_key, ca, ca_path = _ca(tmp_path)
    alice, bob = _leaf(ca_key, ca, "alice"), _leaf(ca_key, ca, "bob")
    crl_path = tmp_path / "clients.crl"
    crl_path.write_bytes(_crl(ca_key, ca.subject, [], der))
    crl = RevocationList.from_files(crl_path, ca_path)
    auth = Authenticator(PolicyHolder.load(tmp_path / "policy.toml"), revocation=crl)
    assert auth.authenticate(alice, [], PEER).name == "alice"
    alice_serial = x509.load_pem_x509_certificate(alice["x509_pem_cert"][0]).serial_number
    crl_path.write_bytes(_crl(ca_key, ca.subject, [alice_serial], der))
    assert auth.authenticate(alice, [], PEER).name == "alice"  # not reloaded yet
    assert crl.reload()
    with pytest.raises(AuthenticationError, match="revoked"):
        auth.authenticate(alice, [], PEER)
    assert auth.authenticate(bob, [], PEER).name == "bob"


def test_forged_crl_is_refused_and_the_old_one_kept(tmp_path: Path) -> None:
    ca_key, ca, ca_path = _ca(tmp_path)
    crl_path = tmp_path / "clients.crl"
    crl_path.write_bytes(_crl(ca_key, ca.subject, [42]))
    crl = RevocationList.from_files(crl_path, ca_path)
    forger = ec.generate_private_key(ec.SECP256R1())
    crl_path.write_bytes(_crl(forger, ca.subject, []))  # "un-revoke" 42 without the CA key
    assert not crl.reload()
    assert crl.revoked(ca.subject.public_bytes(), 42)
    with pytest.raises(RevocationError, match="signature"):
        load_crl(crl_path, [ca])
    crl_path.write_bytes(b"not a crl")
    with pytest.raises(RevocationError, match="not a CRL"):
        load_crl(crl_path, [ca])


def test_one_time_tokens_are_refused_with_several_processes(tmp_path: Path, keys: Keys) -> None:
    """Each process keeps its own replay cache: with two, a one-time token would be
    accepted twice. The policy is refused at start-up, and a reload that turns the cache
    on keeps the previous policy."""
    _write_policy(tmp_path, keys, POLICY + "replay_cache = true\n")
    with pytest.raises(PolicyError, match=r"replay_cache .*server\.processes = 1"):
        PolicyHolder.load(tmp_path / "policy.toml", processes=2)
    assert PolicyHolder.load(tmp_path / "policy.toml", processes=1).current.delegation.replay_cache
    _write_policy(tmp_path, keys, POLICY)
    holder = PolicyHolder.load(tmp_path / "policy.toml", processes=2)
    _write_policy(tmp_path, keys, POLICY + "replay_cache = true\n")
    assert holder.reload() is False
    assert holder.current.delegation.replay_cache is False
