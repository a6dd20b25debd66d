"""The policy file: parsing, rejection of mistakes, reload on SIGHUP, and the decisions."""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from service._gen.medvault.v1 import (
    access_pb2,
    audit_pb2,
    backup_pb2,
    keys_pb2,
    records_pb2,
    signing_pb2,
    stats_pb2,
)
from service.authz import PermissionDeniedError, Policy, PolicyError, PolicyHolder
from service.authz.permissions import KNOWN_PERMISSIONS, RPC_PERMISSIONS
from service.authz.policy import install_sighup, load
from tests.unit.service.authz_matrix import ALLOW, DENY, EXPECTED, PATIENT, PUBLIC_METHODS, ROLES

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_POLICY = ROOT / "deploy" / "policy.toml"

MINIMAL = """
[roles.reader]
permissions = ["records.read"]
patient_scoped = true
"""


@dataclass(frozen=True)
class Caller:
    """Anything with roles: what ``Policy.check`` needs."""

    roles: frozenset[str]


def _write(tmp_path: Path, text: str, name: str = "policy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(PolicyError) as info:
        load(_write(tmp_path, text))
    return str(info.value)


@pytest.fixture(scope="module")
def default_policy() -> Policy:
    return load(DEFAULT_POLICY)


# --- the default file --------------------------------------------------------------


def test_default_policy_loads(default_policy: Policy) -> None:
    assert sorted(default_policy.roles) == sorted(ROLES)
    assert default_policy.applications["local-app"].delegate
    assert not default_policy.applications["local-app"].roles
    assert "test-app" not in default_policy.applications  # test identities stay in tests
    assert not default_policy.delegation.enabled
    assert default_policy.break_glass.max_seconds == 14400
    assert default_policy.incidents.denied_threshold == 20


def test_every_rpc_of_the_protos_has_a_permission() -> None:
    services = [
        records_pb2.DESCRIPTOR.services_by_name["RecordService"],
        access_pb2.DESCRIPTOR.services_by_name["AccessService"],
        audit_pb2.DESCRIPTOR.services_by_name["AuditService"],
        signing_pb2.DESCRIPTOR.services_by_name["SigningService"],
        keys_pb2.DESCRIPTOR.services_by_name["KeyService"],
        backup_pb2.DESCRIPTOR.services_by_name["BackupService"],
        stats_pb2.DESCRIPTOR.services_by_name["StatsService"],
    ]
    methods = {f"/{s.full_name}/{m.name}" for s in services for m in s.methods}
    assert methods == set(RPC_PERMISSIONS)
    assert set(RPC_PERMISSIONS.values()) <= KNOWN_PERMISSIONS


def test_expected_matrix_covers_every_rpc() -> None:
    for role in ROLES:
        assert set(EXPECTED[role]) == set(RPC_PERMISSIONS), role


@pytest.mark.parametrize("role", ROLES)
def test_role_matrix(default_policy: Policy, role: str) -> None:
    """Every (role, RPC) cell of the hand-written table against the policy's decision."""
    caller = Caller(frozenset({role}))
    for method, outcome in EXPECTED[role].items():
        decision = default_policy.check(caller, method)
        actual = DENY if not decision.allowed else PATIENT if decision.patient_scoped else ALLOW
        assert actual == outcome, f"{role} {method}: {decision.reason}"
        assert decision.permission == RPC_PERMISSIONS[method]
    for method in PUBLIC_METHODS:
        assert default_policy.check(caller, method).allowed


def test_no_role_is_denied_everything_but_public(default_policy: Policy) -> None:
    nobody = Caller(frozenset())
    for method in RPC_PERMISSIONS:
        decision = default_policy.check(nobody, method)
        assert not decision.allowed
        assert "role(s) none lack permission" in decision.reason
    for method in PUBLIC_METHODS:
        assert default_policy.check(nobody, method).allowed


def test_unknown_rpc_is_denied(default_policy: Policy) -> None:
    everyone = Caller(frozenset(ROLES))
    decision = default_policy.check(everyone, "/medvault.v1.RecordService/DeleteRecord")
    assert not decision.allowed
    assert decision.permission is None
    assert "deny by default" in decision.reason


def test_denial_reason_names_roles_and_permission(default_policy: Policy) -> None:
    decision = default_policy.check(
        Caller(frozenset({"security_officer"})), "/medvault.v1.RecordService/GetRecord"
    )
    assert decision.reason == "role(s) security_officer lack permission records.read"
    with pytest.raises(PermissionDeniedError, match=r"lack permission records\.read"):
        decision.require()


def test_no_administrative_role_reads_content(default_policy: Policy) -> None:
    for role in ("records_clerk", "security_officer", "backup_operator", "key_admin", "admin"):
        assert "records.read" not in default_policy.permissions_for([role]), role


def test_permissions_union_and_unknown_roles(default_policy: Policy) -> None:
    perms = default_policy.permissions_for(["records_clerk", "security_officer", "ghost"])
    assert {"records.write", "access.grant", "audit.query"} <= perms
    assert "records.read" not in perms
    assert default_policy.permissions_for(["ghost"]) == frozenset()


def test_patient_scope(default_policy: Policy) -> None:
    assert default_policy.is_patient_scoped(["nurse"], "records.write")
    # An unscoped role granting the same permission lifts the scope.
    assert not default_policy.is_patient_scoped(["nurse", "records_clerk"], "records.write")
    assert default_policy.is_patient_scoped(["nurse", "records_clerk"], "records.read")
    # Break-the-glass and whoami are never scoped, or break-the-glass could not work.
    assert not default_policy.is_patient_scoped(["physician"], "access.break_glass")
    assert not default_policy.is_patient_scoped(["physician"], "access.whoami")
    assert not default_policy.is_patient_scoped(["security_officer"], "records.read")


def test_decision_names_granting_roles(default_policy: Policy) -> None:
    caller = Caller(frozenset({"nurse", "physician"}))
    decision = default_policy.check(caller, "/medvault.v1.RecordService/GetRecord")
    assert decision.allowed
    assert decision.patient_scoped
    assert decision.reason == "granted by role(s) nurse, physician"


# --- mistakes in the file ------------------------------------------------------------


def test_unknown_key_named_with_line(tmp_path: Path) -> None:
    message = _error(tmp_path, MINIMAL + "permisions = []\n")
    assert "unknown key 'permisions'" in message
    assert "[roles.reader]" in message
    assert "policy.toml:5:" in message


def test_unknown_section(tmp_path: Path) -> None:
    message = _error(tmp_path, MINIMAL + "\n[role.typo]\npermissions = []\n")
    assert "unknown section [role]" in message
    assert "policy.toml:6:" in message


def test_unknown_permission(tmp_path: Path) -> None:
    message = _error(tmp_path, '[roles.reader]\npermissions = ["records.raed"]\n')
    assert "unknown permission 'records.raed'" in message
    assert ":2:" in message


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (
            '[applications."his-app"]\ndelegate = true\nroles = ["writer"]\n',
            "unknown role 'writer'",
        ),
        ('[principals."dr-lan"]\nroles = ["doctor"]\n', "unknown role 'doctor'"),
        ('[principals."dr-lan"]\n', "roles is required"),
        ('[applications."his-app"]\ndelegate = "yes"\n', "delegate must be a boolean"),
        ("[break_glass]\nmax_seconds = -1\n", "max_seconds must be positive"),
        ("[incidents]\nread_threshold = true\n", "read_threshold must be a integer"),
        ('[delegation]\nalgorithms = ["HS256"]\n', "algorithms must be among ES256, RS256"),
        ('[delegation]\njwks_file = "jwks.json"\n', "issuer is required"),
        (
            '[delegation]\njwks_file = "missing.json"\nissuer = "i"\naudience = "a"\n',
            "cannot read jwks_file",
        ),
    ],
)
def test_invalid_entries_are_named(tmp_path: Path, extra: str, needle: str) -> None:
    assert needle in _error(tmp_path, MINIMAL + extra)


def test_role_without_permissions_or_bad_type(tmp_path: Path) -> None:
    assert "permissions is required" in _error(tmp_path, "[roles.reader]\n")
    message = _error(
        tmp_path, '[roles.reader]\npermissions = ["records.read"]\npatient_scoped = 1\n'
    )
    assert "patient_scoped must be a boolean" in message


def test_empty_policy_is_refused(tmp_path: Path) -> None:
    assert "defines no roles" in _error(tmp_path, "")


def test_not_toml(tmp_path: Path) -> None:
    assert "not valid TOML" in _error(tmp_path, "[roles.reader\n")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load(tmp_path / "absent.toml")


def test_jwks_with_private_key_is_refused(tmp_path: Path) -> None:
    _write(tmp_path, '{"keys": [{"kty": "EC", "kid": "k", "crv": "P-256", "d": "x"}]}', "jwks.json")
    message = _error(
        tmp_path, MINIMAL + '[delegation]\njwks_file = "jwks.json"\nissuer = "i"\naudience = "a"\n'
    )
    assert "private key material" in message


# --- reload ----------------------------------------------------------------------------


def test_reload_swaps_valid_policy(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL)
    holder = PolicyHolder.load(path)
    first = holder.current
    path.write_text(MINIMAL + '\n[roles.clerk]\npermissions = ["records.write"]\n')
    assert holder.reload()
    assert holder.current is not first
    assert "clerk" in holder.current.roles


def test_reload_keeps_old_policy_on_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path, MINIMAL)
    holder = PolicyHolder.load(path)
    first = holder.current
    path.write_text(MINIMAL + "oops = 1\n")
    with caplog.at_level(logging.ERROR, logger="service.authz.policy"):
        assert not holder.reload()
    assert holder.current is first
    assert "unknown key 'oops'" in caplog.text
    assert "keeping the previous policy" in caplog.text


def test_sighup_reloads(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL)
    holder = PolicyHolder.load(path)
    previous = install_sighup(holder)
    try:
        path.write_text(MINIMAL + '\n[roles.clerk]\npermissions = ["records.write"]\n')
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "clerk" not in holder.current.roles and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "clerk" in holder.current.roles
    finally:
        signal.signal(signal.SIGHUP, previous)
