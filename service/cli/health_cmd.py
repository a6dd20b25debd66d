"""``medvault health``: the service's gRPC health, for probes and operators.

Kubernetes' built-in gRPC probe and Docker's health check cannot present a client
certificate, and medvault answers nothing without one (mutual TLS), so container
probes run this command instead (docs/deployment.md). Health needs no role: any
certificate of the client CA will do, e.g. one issued to a ``probe`` principal.
Exit 0 when every named service is ``SERVING``; 1 otherwise, naming the first that is not.

Probes run it as ``python -m service.cli.health_cmd``: the same command without loading
the rest of the CLI (about a third of the CPU time of ``medvault health``, which counts
when every replica runs it every few seconds).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.cli.client import add_connection_flags, channel, describe_rpc_error

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


def _arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_flags(parser)
    parser.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME",
        help="also check this health service name (repeatable), e.g. medvault.dependency.token",
    )
    parser.add_argument(
        "--dependencies",
        action="store_true",
        help="also check the database, the object store and the token",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per check (default 5)")
    parser.add_argument("--quiet", action="store_true", help="print only a failure")
    parser.set_defaults(func=cmd_health)


DESCRIPTION = "Ask the gRPC health service; exit 0 when every named service serves."


def register(sub: Any) -> None:
    """Add ``health`` to the CLI."""
    _arguments(
        sub.add_parser(
            "health",
            help="check the service's gRPC health (exit 0 when serving)",
            description=DESCRIPTION,
        )
    )


def probe_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m service.cli.health_cmd`` (the flags of ``medvault health``)."""
    parser = argparse.ArgumentParser(prog="medvault health", description=DESCRIPTION)
    _arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m service.cli.health_cmd``: ``medvault health`` alone, for probes."""
    ns = probe_parser().parse_args(argv)
    try:
        return cmd_health(ns)
    except grpc.RpcError as e:
        print(describe_rpc_error(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
