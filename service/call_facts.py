"""What the access guard knows of a call: the transport's facts, the authenticated and
authorized call, a refusal; and the audit labels drawn from them (source host,
presenting application, record resource).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from service.authn import AuthenticationError, Principal
from service.authz import PermissionDeniedError
from service.authz.model import Decision
from storage import RecordRef


@dataclass(frozen=True, slots=True)
class CallFacts:
    """What the transport says about a call, captured on the event loop."""

    method: str
    auth_context: Mapping[str, Sequence[bytes]]
    metadata: Sequence[tuple[str, str | bytes]]
    peer: str


@dataclass(frozen=True, slots=True)
class Call:
    """An authenticated, authorized call."""

    facts: CallFacts
    principal: Principal
    decision: Decision

    @property
    def action(self) -> str:
        """The permission exercised, which names the action in the audit trail."""
        return self.decision.permission or self.facts.method


@dataclass(frozen=True, slots=True)
class Refusal:
    """A call ``AccessGuard.admit`` refused: denied by the policy (``call``) or not
    authenticated (``error``); exactly one is set."""

    facts: CallFacts
    call: Call | None
    error: AuthenticationError | PermissionDeniedError | None

    def exception(self) -> AuthenticationError | PermissionDeniedError:
        """What the caller is told: the authentication error, or the policy's denial."""
        if self.error is not None:
            return self.error
        assert self.call is not None  # one of the two is set
        return PermissionDeniedError(self.call.decision.reason)


def source_host(peer: str) -> str:
    """The peer without its port (``ipv4:10.0.0.7:51234`` -> ``ipv4:10.0.0.7``): a client
    reconnecting for each attempt must not escape the per-source incident window."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


def presenting_application(facts: CallFacts) -> str | None:
    """The verified certificate CN of a call, or None without TLS."""
    names = facts.auth_context.get("x509_common_name") or []
    return bytes(names[0]).decode(errors="replace") if names else None


def record_resource(ref: RecordRef) -> str:
    """The audit resource of a record reference."""
    if ref.id is None:
        return "patient-records"
    return f"record/{ref.id}" + (f"/v{ref.version}" if ref.version else "")
