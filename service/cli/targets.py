"""Where the CLI's channel goes: one service address or several replicas, balanced.

``--endpoint`` (or ``MEDVAULT_ENDPOINT``) is ``HOST:PORT`` or a comma-separated list of
them, one per replica (``medvault stack env`` of a cluster stack prints such a list).
Either way the channel

* spreads calls over every address the target resolves to (gRPC's client-side
  ``round_robin`` policy: a list becomes a static ``ipv4:``/``ipv6:`` target; one name
  is resolved by gRPC's DNS resolver, so a name with several addresses is balanced too);
* retries a call that failed UNAVAILABLE, up to 3 attempts with backoff, for the
  methods in :data:`IDEMPOTENT`: reads, lists, stats and verifications, and
  ``PutRecord``, which the CLI always sends with a ``request_id`` so that a retry
  returns the first attempt's record instead of storing a second one (the server keeps
  request ids for ``server.request_id_retention_hours``; docs/operations.md).

gRPC retries a call only while it is not committed: before the first response message
arrived and while what was sent fits the retry buffer (:data:`RETRY_BUFFER` per call;
larger uploads are not replayed by gRPC, and the CLI's own retry of a put covers them).
The TLS server name checked is the first address's host for every replica, so the
replicas' certificates must all name it (the local stack's certificates name 127.0.0.1
and localhost).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass

# Methods safe to send twice: they change nothing, or (PutRecord) carry a request id.
IDEMPOTENT = {
    "medvault.v1.RecordService": ("GetRecord", "StatRecord", "ListRecords", "ListStudies",
                                  "GetStudy", "PutRecord"),
    "medvault.v1.AccessService": ("ListGrants", "WhoAmI"),
    "medvault.v1.AuditService": ("QueryEvents", "VerifyChain", "ExportEvents", "ListBreakGlass"),
    "medvault.v1.BackupService": ("ListBackups", "GetBackupPublicKey"),
    "medvault.v1.KeyService": ("ListKeks", "ListSigners"),
    "medvault.v1.SigningService": ("VerifyRecord", "GetSignature"),
    "medvault.v1.StatsService": ("CountRecords",),
}  # fmt: skip
# Not the health check: `medvault health` asks whether *this* address serves, and a
# retry (on another replica, or after a backoff) would blur the answer a probe needs.
MAX_ATTEMPTS = 3
RETRY_BUFFER = 8 << 20  # bytes of one call's requests kept for a replay
MAX_RECONNECT_BACKOFF_MS = 5_000

SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [
                {"service": s, "method": m} for s, methods in IDEMPOTENT.items() for m in methods
            ],
            "retryPolicy": {
                "maxAttempts": MAX_ATTEMPTS,
                "initialBackoff": "0.2s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


class EndpointError(ValueError):
    """``--endpoint`` is not HOST:PORT[,HOST:PORT...]; the message says which part."""


@dataclass(frozen=True)
class Target:
    """A gRPC target and the options that balance and retry over it."""

    target: str
    authority: str  # HOST:PORT whose host the servers' certificates must name
    addresses: tuple[str, ...]

    def options(self) -> list[tuple[str, str | int]]:
        """Channel options: round robin, the retry policy and the TLS name."""
        return [
            ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
            ("grpc.enable_retries", 1),
            ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER),
            # A replica back from a restart is used again within seconds, not after
            # gRPC's default reconnect backoff of up to 120 s (long bulk imports).
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
            ("grpc.default_authority", self.authority),
        ]


def parse(endpoint: str) -> Target:
    """The target for ``HOST:PORT`` or ``HOST:PORT,HOST:PORT,...``."""
    parts = [p.strip() for p in endpoint.split(",")]
    if not all(parts):
        raise EndpointError(f"--endpoint {endpoint!r} has an empty address between commas")
    pairs = [_split(p) for p in parts]
    if len(pairs) == 1:
        return Target(parts[0], parts[0], (parts[0],))
    resolved = [(_address(host, port), port) for host, port in pairs]
    families = {isinstance(ipaddress.ip_address(a), ipaddress.IPv6Address) for a, _ in resolved}
    if len(families) > 1:
        raise EndpointError(f"--endpoint {endpoint!r} mixes IPv4 and IPv6 addresses; use one")
    if families == {True}:
        listed = ",".join(f"[{a}]:{p}" for a, p in resolved)
        return Target(f"ipv6:{listed}", parts[0], tuple(parts))
    return Target("ipv4:" + ",".join(f"{a}:{p}" for a, p in resolved), parts[0], tuple(parts))


def _split(part: str) -> tuple[str, int]:
    host, sep, port = part.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EndpointError(f"--endpoint address {part!r} must be HOST:PORT")
    return host, int(port)


def _address(host: str, port: int) -> str:
    """``host`` as an IP address: itself, or the first address its name resolves to."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    error: socket.gaierror | None = None
    for family in (socket.AF_INET, socket.AF_UNSPEC):  # IPv4 first, as "localhost" should
        try:
            found = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        except socket.gaierror as e:
            error = e
            continue
        return str(found[0][4][0])
    reason = error.strerror if error else "no address"
    raise EndpointError(f"--endpoint host {host!r} does not resolve ({reason})")
