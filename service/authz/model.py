"""The access policy as data: roles, applications, limits, and the decision it makes.

Everything here is a frozen dataclass with no I/O, so a ``Policy`` is shared freely
between request threads. Reading the TOML file (and the JWKS file it names) is
``service.authz.policy``'s job.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import jwt

from service.authz.permissions import (
    PATIENT_DATA_PERMISSIONS,
    is_public,
    permission_for,
)
from service.errors import ServiceError

# Asymmetric algorithms only: with HS* the verification key is the signing key, and a
# public JWKS key used as an HMAC secret is the classic algorithm-confusion forgery.
SUPPORTED_ALGORITHMS = ("ES256", "RS256")
_EMPTY: Mapping[str, Any] = MappingProxyType({})


class PolicyError(ServiceError):
    """The policy file is missing or invalid; the message names the key and line."""

    def __init__(self, message: str, path: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.path = path  # TOML key path of the offending entry, used to find its line


class PermissionDeniedError(ServiceError):
    """The caller is authenticated but not allowed to do this (PERMISSION_DENIED)."""


@dataclass(frozen=True, slots=True)
class Role:
    """A named set of permissions; ``patient_scoped`` roles need a grant per patient."""

    name: str
    permissions: frozenset[str]
    patient_scoped: bool = False
    description: str = ""


@dataclass(frozen=True, slots=True)
class Application:
    """A calling application, named by its certificate CN."""

    name: str
    delegate: bool = False
    roles: frozenset[str] = frozenset()
    # The IdP's client id for this application when it differs from the CN; a token's
    # ``azp`` must equal it, so a token issued to one application is no good to another.
    client_id: str = ""

    @property
    def token_client(self) -> str:
        """The ``azp`` a delegation token presented by this application must carry."""
        return self.client_id or self.name


@dataclass(frozen=True, slots=True)
class DelegationConfig:
    """How end-user tokens are verified; delegation is off while ``keys`` is empty."""

    jwks_file: Path | None = None
    issuer: str = ""
    audience: str = ""
    algorithms: tuple[str, ...] = SUPPORTED_ALGORITHMS
    leeway_seconds: int = 30
    keys: Mapping[str, jwt.PyJWK] = field(default_factory=lambda: _EMPTY)
    # One-time tokens: every token must carry a ``jti`` that this process has not seen
    # before its ``exp``. Off by default: ordinary OIDC access tokens are reused.
    replay_cache: bool = False
    replay_cache_size: int = 100_000

    @property
    def enabled(self) -> bool:
        """True when a JWKS file with at least one usable key is configured."""
        return bool(self.keys)


@dataclass(frozen=True, slots=True)
class BreakGlassConfig:
    """Limits of break-the-glass access."""

    max_seconds: int = 14400


@dataclass(frozen=True, slots=True)
class IncidentConfig:
    """Thresholds of incident detection (Circular 53, Article 4.5)."""

    denied_threshold: int = 20
    denied_window_seconds: int = 60
    read_threshold: int = 1000
    read_window_seconds: int = 300


class Caller(Protocol):
    """What a decision needs to know about the caller (``authn.Principal`` fits)."""

    @property
    def roles(self) -> frozenset[str]:
        """The caller's effective roles."""
        ...


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of ``Policy.check``; ``reason`` is safe to return to the caller."""

    allowed: bool
    permission: str | None
    patient_scoped: bool
    reason: str

    def require(self) -> Decision:
        """Return self when allowed; raise ``PermissionDeniedError`` otherwise."""
        if not self.allowed:
            raise PermissionDeniedError(self.reason)
        return self


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed, validated policy; immutable, so it is shared freely between threads."""

    roles: Mapping[str, Role]
    applications: Mapping[str, Application] = field(default_factory=lambda: _EMPTY)
    principals: Mapping[str, frozenset[str]] = field(default_factory=lambda: _EMPTY)
    delegation: DelegationConfig = field(default_factory=DelegationConfig)
    break_glass: BreakGlassConfig = field(default_factory=BreakGlassConfig)
    incidents: IncidentConfig = field(default_factory=IncidentConfig)
    source: Path | None = None

    def known_roles(self, names: Iterable[str]) -> frozenset[str]:
        """Those of ``names`` that this policy defines (others are ignored, not errors)."""
        return frozenset(n for n in names if n in self.roles)

    def permissions_for(self, roles: Iterable[str]) -> frozenset[str]:
        """Every permission any of ``roles`` grants; unknown role names grant nothing."""
        granted: set[str] = set()
        for name in self.known_roles(roles):
            granted |= self.roles[name].permissions
        return frozenset(granted)

    def _granting(self, roles: Iterable[str], permission: str) -> list[Role]:
        return sorted(
            (
                self.roles[n]
                for n in self.known_roles(roles)
                if permission in self.roles[n].permissions
            ),
            key=lambda r: r.name,
        )

    def is_patient_scoped(self, roles: Iterable[str], permission: str) -> bool:
        """True if ``permission`` comes only through patient-scoped roles.

        One unscoped role carrying the permission lifts the scope (a records clerk who is
        also a nurse writes for any patient). Permissions that do not touch one patient's
        records are never scoped.
        """
        if permission not in PATIENT_DATA_PERMISSIONS:
            return False
        granting = self._granting(roles, permission)
        return bool(granting) and all(r.patient_scoped for r in granting)

    def check(self, principal: Caller, rpc_method: str) -> Decision:
        """May ``principal`` call ``rpc_method`` (``/pkg.Service/Method``)? Deny by default."""
        if is_public(rpc_method):
            return Decision(True, None, False, "public service")
        permission = permission_for(rpc_method)
        if permission is None:
            return Decision(
                False, None, False, f"{rpc_method} is not a known RPC (deny by default)"
            )
        granting = self._granting(principal.roles, permission)
        if not granting:
            held = ", ".join(sorted(principal.roles)) or "none"
            return Decision(
                False, permission, False, f"role(s) {held} lack permission {permission}"
            )
        names = tuple(r.name for r in granting)
        scoped = self.is_patient_scoped(principal.roles, permission)
        return Decision(True, permission, scoped, f"granted by role(s) {', '.join(names)}")
