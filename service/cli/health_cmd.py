"""``medvault health``: the service's gRPC health, for probes and operators.

Kubernetes' built-in gRPC probe and Docker's health check cannot present a client
certificate, and medvault answers nothing without one (mutual TLS), so container
probes run this command instead (docs/deployment.md). Health needs no role: any
certificate of the client CA will do, e.g. one issued to a ``probe`` principal.
Exit 0 when every named service is ``SERVING``; 1 otherwise, naming the first that is not.
"""

from __future__ import annotations

import argparse
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.cli.client import add_connection_flags, channel

DEPENDENCIES = (
    "medvault.dependency.database",
    "medvault.dependency.object_store",
    "medvault.dependency.token",
)


def cmd_health(ns: argparse.Namespace) -> int:
    """Check each service named (the overall status ``""`` first); 0 when all serve."""
    names = ["", *(DEPENDENCIES if ns.dependencies else ()), *ns.service]
    stub = health_pb2_grpc.HealthStub(channel(ns))
    for name in dict.fromkeys(names):  # order kept, duplicates dropped
        reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=ns.timeout)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            print(f"{name or 'medvault'}: {status}")
            return 1
        if not ns.quiet:
            print(f"{name or 'medvault'}: {status}")
    return 0


def register(sub: Any) -> None:
    """Add ``health`` to the CLI."""
    health = sub.add_parser(
        "health", help="check the service's gRPC health (exit 0 when serving)",
        description="Ask the gRPC health service; exit 0 when every named service serves.",
    )  # fmt: skip
    add_connection_flags(health)
    health.add_argument(
        "--service", action="append", default=[], metavar="NAME",
        help="also check this health service name (repeatable), e.g. "
        "medvault.dependency.token",
    )  # fmt: skip
    health.add_argument(
        "--dependencies", action="store_true",
        help="also check the database, the object store and the token",
    )  # fmt: skip
    health.add_argument("--timeout", type=float, default=5.0, help="seconds per check (default 5)")
    health.add_argument("--quiet", action="store_true", help="print only a failure")
    health.set_defaults(func=cmd_health)
