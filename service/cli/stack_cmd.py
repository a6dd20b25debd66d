"""``medvault stack up|down|status|env``: the local development stack.

The home directory comes from ``--home``, else ``MEDVAULT_HOME``, else ``./.medvault``.
``env`` prints only ``export`` lines, so ``eval "$(medvault stack env)"`` works; every
progress line of the other commands goes to stdout, errors to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.localstack.names import DEFAULT_CLIENTS, DEFAULT_REPLICAS, TOPOLOGIES

if TYPE_CHECKING:
    from service.localstack.stack import ComponentStatus, LocalStack


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``stack`` and its sub-commands to the ``medvault`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--home",
        type=Path,
        default=None,
        help="stack directory (default: $MEDVAULT_HOME or ./.medvault)",
    )
    stack = subparsers.add_parser("stack", help="run the local development stack")
    commands = stack.add_subparsers(dest="stack_command", metavar="COMMAND", required=True)

    up = commands.add_parser(
        "up", parents=[common], help="create what is missing and start everything"
    )
    up.add_argument(
        "--timeout", type=float, default=None,
        help="seconds to wait for the service's health (default 30; cluster 60, per replica)",
    )  # fmt: skip
    up.add_argument(
        "--topology", choices=TOPOLOGIES, default=None,
        help="single: one service, one SeaweedFS server, SQLite (default for a new home); "
        "cluster: service replicas over the machine's PostgreSQL and a SeaweedFS cluster "
        "(master, 3 volume servers, filer, S3 gateway). A home keeps its topology",
    )  # fmt: skip
    up.add_argument(
        "--replicas", type=int, default=None,
        help=f"cluster: how many service replicas (default {DEFAULT_REPLICAS}; kept for later ups)",
    )  # fmt: skip
    up.add_argument(
        "--database-url", default=None,
        help="cluster, new home: the PostgreSQL database (default: medvault_stack_<hash> on "
        "the machine's PostgreSQL at 127.0.0.1:5432, created if missing)",
    )  # fmt: skip
    up.set_defaults(func=_up)

    down = commands.add_parser("down", parents=[common], help="stop the service and SeaweedFS")
    down.set_defaults(func=_down)

    status = commands.add_parser(
        "status", parents=[common],
        help="show each component; exit status 1 when one is stopped or absent",
    )  # fmt: skip
    status.set_defaults(func=_status)

    env = commands.add_parser(
        "env", parents=[common], help='print export lines: eval "$(medvault stack env)"'
    )
    env.add_argument(
        "--as",
        dest="client",
        default="local-admin",
        metavar="ROLE|NAME",
        help=f"act as the sample client of a role ({', '.join(DEFAULT_CLIENTS.values())}) "
        f"or as a client certificate name ({', '.join(DEFAULT_CLIENTS)}); default local-admin",
    )
    env.set_defaults(func=_env)


def _stack(args: argparse.Namespace) -> LocalStack:
    # Readiness polls of a starting SeaweedFS fail by design; urllib3 would log every
    # refused connection as a retry warning.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    # The stack's machinery is imported when a stack command runs, not to build the parser.
    from service.localstack.cluster import open_stack  # noqa: PLC0415
    from service.localstack.stack import default_home  # noqa: PLC0415

    home: Path | None = args.home
    return open_stack(
        home.absolute() if home else default_home(),
        getattr(args, "topology", None),
        replicas=getattr(args, "replicas", None),
        database_url=getattr(args, "database_url", None),
    )


def _run(action: Callable[[], object]) -> int:
    """Run ``action``; a stack error becomes one line on stderr and exit status 1."""
    from service.localstack.stack import LocalStackError  # noqa: PLC0415

    try:
        action()
    except LocalStackError as e:
        print(f"medvault stack: error: {e}", file=sys.stderr)
        return 1
    return 0


def _up(args: argparse.Namespace) -> int:
    timeout = {} if args.timeout is None else {"health_timeout": args.timeout}
    return _run(lambda: _stack(args).up(**timeout))


def _down(args: argparse.Namespace) -> int:
    return _run(lambda: _stack(args).down())


def _status(args: argparse.Namespace) -> int:
    components: list[ComponentStatus] = []
    code = _run(lambda: components.extend(_stack(args).status()))
    down = [c.name for c in components if c.state in ("stopped", "absent")]
    if code == 0 and down:
        print(f"medvault stack: not up: {', '.join(down)} (run `medvault stack up`)",
              file=sys.stderr)  # fmt: skip
        return 1
    return code


def _env(args: argparse.Namespace) -> int:
    return _run(lambda: sys.stdout.write(_stack(args).env(args.client)))
