"""Who is calling: the client certificate, and the end user an application acts for.

Mutual TLS names the caller (certificate CN; the OU may name its role). An application
marked ``delegate = true`` in the policy may add ``authorization: Bearer <JWT>``: the
token is verified against the policy's JWKS keys (ES256/RS256 only; issuer, audience,
expiry and not-before checked) and the effective principal becomes "user via
application". Errors name the class of problem ("token expired") and never carry the
token or its claims: a token is a credential, and logs must not become a store of them.

A token is bound to the application presenting it: its ``azp`` must name that
application (its CN, or the policy's ``client_id`` for it), so a token stolen from one
application is useless to another. With ``[delegation] replay_cache`` on, each token is
single-use (``service.replay``). Names that reach the audit trail (certificate CNs, token
subjects) must be printable, bounded and must not contain " via ", which would let
one principal pass for a delegated other; a refusal never echoes the bad name. When a
CRL is configured (``service.revocation``) a revoked client certificate is refused on
every call.

This module takes plain values (auth context, metadata, peer) rather than a gRPC
context, so it is tested without a server; the interceptor adapts.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jwt
from cryptography import x509
from cryptography.x509.oid import NameOID

from service.authz.model import Application, DelegationConfig, PermissionDeniedError, Policy
from service.authz.policy import PolicyHolder
from service.errors import ServiceError
from service.replay import ReplayCache, ReplayError

ANONYMOUS = "anonymous"
# A JWT from a hospital IdP is a few KiB at most; a bigger one is refused before any
# parsing so that a hostile header costs nothing.
_MAX_TOKEN_LENGTH = 16 << 10
# The grants table and the audit trail hold principal names of up to 128 characters.
_MAX_NAME_LENGTH = 128
# Names the trail uses for callers it could not identify: nobody may hold one.
_RESERVED_NAMES = frozenset({ANONYMOUS, "unauthenticated", "unknown"})
_REQUIRED_CLAIMS = ["exp", "iss", "aud", "sub"]


class AuthenticationError(ServiceError):
    """No or bad credentials (UNAUTHENTICATED); the message never contains the token."""


class DelegationNotAllowedError(PermissionDeniedError):
    """The application may not act for end users (PERMISSION_DENIED)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """The effective caller: a person or application, and the application relaying it."""

    name: str
    application: str | None  # set when ``name`` is a delegated user
    roles: frozenset[str]
    source: str  # the peer address, e.g. "ipv4:10.0.0.7:51234"

    @property
    def display(self) -> str:
        """``dr-lan via his-app`` for a delegated user, else the name alone."""
        return f"{self.name} via {self.application}" if self.application else self.name

    @property
    def delegated(self) -> bool:
        """True when an application acts for a user with a token."""
        return self.application is not None


class RevocationCheck(Protocol):
    """Answers whether a client certificate is revoked (``service.revocation``)."""

    def revoked(self, issuer: bytes, serial: int) -> bool:
        """True when certificate ``serial`` of ``issuer`` (DER name) is revoked."""
        ...


@dataclass(frozen=True, slots=True)
class _Certificate:
    common_name: str
    units: tuple[str, ...]  # organizational units: candidate role names
    issuer: bytes = b""  # DER name; empty when only the CN is known
    serial: int | None = None


def check_name(what: str, name: str) -> str:
    """``name`` if it can name a principal; ``AuthenticationError`` (never echoing it)."""
    if not name or len(name) > _MAX_NAME_LENGTH:
        raise AuthenticationError(f"{what} must be 1..{_MAX_NAME_LENGTH} characters")
    # isprintable() refuses NUL, every control character and the line separators that
    # could forge a line in a log or a terminal table.
    if not name.isprintable():
        raise AuthenticationError(f"{what} has control or non-printable characters")
    if name.lower() in _RESERVED_NAMES:
        raise AuthenticationError(f"{what} is a name medvault reserves for its own events")
    if " via " in name.lower():
        raise AuthenticationError(f"{what} contains ' via ' and could pass for a delegated user")
    return name


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


@functools.lru_cache(maxsize=1024)
def _parse_pem(pem: bytes) -> _Certificate:
    """CN and OUs of a PEM certificate; cached since a client sends the same one per call."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise AuthenticationError("client certificate is unreadable") from e
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise AuthenticationError("client certificate has no common name")
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return _Certificate(
        _text(names[0].value),
        tuple(_text(u.value) for u in units),
        cert.issuer.public_bytes(),
        cert.serial_number,
    )


def _certificate(auth_context: Mapping[str, Sequence[bytes]]) -> _Certificate | None:
    """The verified client certificate gRPC reports, or None when TLS is off."""
    pems = auth_context.get("x509_pem_cert") or []
    if pems:
        return _parse_pem(bytes(pems[0]))
    # Without the PEM (older transports) the CN alone still names the caller.
    names = auth_context.get("x509_common_name") or []
    return _Certificate(names[0].decode("utf-8", "replace"), ()) if names else None


def _bearer_token(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    """The token of ``authorization: Bearer <token>``, or None if there is no such header."""
    values = [v for k, v in metadata if k.lower() == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise AuthenticationError("malformed authorization metadata: more than one value")
    raw = values[0]
    value = raw if isinstance(raw, str) else raw.decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("malformed authorization metadata: expected 'Bearer <token>'")
    if len(token) > _MAX_TOKEN_LENGTH:
        raise AuthenticationError("malformed token: too long")
    return token


# Most specific first: several of PyJWT's errors subclass DecodeError.
_TOKEN_PROBLEMS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "token audience mismatch"),
    (jwt.InvalidIssuerError, "token issuer mismatch"),
    (jwt.InvalidSignatureError, "token signature invalid"),
    (jwt.InvalidAlgorithmError, "token algorithm not allowed"),
    (jwt.DecodeError, "malformed token"),
)


def _problem(error: jwt.PyJWTError) -> str:
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"token missing claim {error.claim}"
    for cls, message in _TOKEN_PROBLEMS:
        if isinstance(error, cls):
            return message
    return "token invalid"


def verify_token(config: DelegationConfig, token: str) -> dict[str, Any]:
    """The verified claims of ``token``; ``AuthenticationError`` names what is wrong."""
    if not config.enabled:
        raise AuthenticationError(
            "delegation is not configured on this server (no [delegation] jwks_file in the policy)"
        )
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as e:
        raise AuthenticationError("malformed token") from e
    # Checked before the key lookup so "none" and HS* fail the same way whatever the kid.
    if header.get("alg") not in config.algorithms:
        raise AuthenticationError("token algorithm not allowed")
    key = config.keys.get(str(header.get("kid", "")))
    if key is None:
        raise AuthenticationError("token key unknown (kid not in the JWKS)")
    try:
        # The PyJWK binds its own algorithm, so an ES256 key never verifies as RS256.
        return jwt.decode(
            token,
            key,
            algorithms=list(config.algorithms),
            audience=config.audience,
            issuer=config.issuer,
            leeway=config.leeway_seconds,
            options={"require": _REQUIRED_CLAIMS},
        )
    except jwt.PyJWTError as e:
        raise AuthenticationError(_problem(e)) from e


def _subject(policy: Policy, claims: Mapping[str, Any]) -> str:
    sub = claims.get("sub")
    # The subject goes into logs and the audit trail: printable and bounded only.
    if not isinstance(sub, str):
        raise AuthenticationError("malformed token: sub must be a non-empty string")
    subject = check_name("malformed token: sub", sub)
    # Grants, call shares and the trail key on the name alone: a user the IdP calls
    # "pacs-app" would act as that application. Compared without case, so that a
    # look-alike differing in case cannot pass for it in the officer's reports either.
    folded = subject.casefold()
    if any(folded == name.casefold() for name in policy.applications):
        raise AuthenticationError("malformed token: sub names an application of the policy")
    return subject


def _check_azp(application: Application, claims: Mapping[str, Any]) -> None:
    """The token must have been issued to the application presenting it."""
    azp = claims.get("azp")
    if azp is None:
        raise AuthenticationError("token missing claim azp")
    if azp != application.token_client:
        raise AuthenticationError(
            f"token was issued to another application (azp), not to {application.name}"
        )


def _user_roles(policy: Policy, subject: str, claims: Mapping[str, Any]) -> frozenset[str]:
    """Policy ``[principals.<sub>]`` wins; else the token's ``roles`` that the policy knows."""
    if subject in policy.principals:
        return policy.principals[subject]
    roles = claims.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise AuthenticationError("malformed token: roles must be a list of strings")
    return policy.known_roles(roles)


def _certificate_roles(policy: Policy, cert: _Certificate) -> frozenset[str]:
    """Policy ``[principals.<CN>]``, else the application's roles, else the OU's roles."""
    if cert.common_name in policy.principals:
        return policy.principals[cert.common_name]
    application = policy.applications.get(cert.common_name)
    if application is not None:
        return application.roles
    return policy.known_roles(cert.units)


class Authenticator:
    """Turns what gRPC knows about a call into a ``Principal`` under the live policy."""

    def __init__(
        self,
        holder: PolicyHolder,
        revocation: RevocationCheck | None = None,
        replay: ReplayCache | None = None,
    ) -> None:
        self._holder = holder
        self._revocation = revocation
        # The cache outlives policy reloads (it is state, not configuration).
        self._replay = replay or ReplayCache()

    def _checked_certificate(
        self, auth_context: Mapping[str, Sequence[bytes]]
    ) -> _Certificate | None:
        cert = _certificate(auth_context)
        if cert is None:
            return None
        check_name("client certificate common name", cert.common_name)
        if self._revocation is not None:
            if cert.serial is None:  # cannot tell: fail closed
                raise AuthenticationError("client certificate unavailable for revocation check")
            if self._revocation.revoked(cert.issuer, cert.serial):
                raise AuthenticationError("client certificate is revoked")
        return cert

    def authenticate(
        self,
        auth_context: Mapping[str, Sequence[bytes]],
        metadata: Sequence[tuple[str, str | bytes]],
        peer: str,
    ) -> Principal:
        """The effective principal of a call; raises on bad credentials or delegation."""
        policy = self._holder.current  # one snapshot for the whole decision
        cert = self._checked_certificate(auth_context)
        token = _bearer_token(metadata)
        if token is None:
            if cert is None:
                return Principal(ANONYMOUS, None, frozenset(), peer)
            return Principal(cert.common_name, None, _certificate_roles(policy, cert), peer)
        app_name = cert.common_name if cert else None
        application = policy.applications.get(app_name) if app_name else None
        if application is None or not application.delegate:
            raise DelegationNotAllowedError(
                f"application {app_name or ANONYMOUS} is not allowed to act for users"
            )
        claims = verify_token(policy.delegation, token)
        _check_azp(application, claims)
        subject = _subject(policy, claims)
        roles = _user_roles(policy, subject, claims)
        delegation = policy.delegation
        if delegation.replay_cache:
            try:
                self._replay.admit(claims, delegation.replay_cache_size, delegation.leeway_seconds)
            except ReplayError as e:
                raise AuthenticationError(str(e)) from e
        return Principal(subject, application.name, roles, peer)
