"""The ``medvault`` command."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from datetime import timedelta
from pathlib import Path

import grpc

from keystore import KeystoreError
from service import logs
from service.cli import (
    access_cmd,
    audit_cmd,
    backup_cmd,
    health_cmd,
    import_cmd,
    keys_cmd,
    records_cmd,
    restore_cmd,
    signing_cmd,
    stack_cmd,
    stats_cmd,
    studies_cmd,
)
from service.cli.options import config_path
from service.config import ConfigError, load
from storage import StorageError


def cmd_serve(ns: argparse.Namespace) -> int:
    """Run the gRPC service in the foreground: in this process, or supervised workers."""
    path = config_path(ns)
    config = load(path)
    if ns.worker is None and config.server.process_count > 1:
        from service.supervisor import supervise  # noqa: PLC0415

        return supervise(Path(path), config, config.server.process_count)
    from service.server import serve  # noqa: PLC0415  (keeps client commands light)
    from service.worker import WorkerRole  # noqa: PLC0415

    worker = None
    if ns.worker is not None:
        if ns.ready_fd is None or ns.supervisor_pid is None:
            raise SystemExit("medvault serve: --worker is for the supervisor's workers only")
        worker = WorkerRole(ns.worker, ns.ready_fd, ns.supervisor_pid)
    serve(config, worker)
    return 0


def cmd_sweep(ns: argparse.Namespace) -> int:
    """Remove objects no record references, older than the grace period."""
    from service.bootstrap import build  # noqa: PLC0415
    from storage import sweep_orphans  # noqa: PLC0415

    components = build(load(config_path(ns)))
    try:
        result = sweep_orphans(
            components.blobs, components.metadata, timedelta(seconds=ns.grace_seconds),
            on_missing_row=components.missing_row,
        )  # every referenced object's tag is checked: backfill=None
    finally:
        components.close()
    print(f"scanned {result.scanned} objects, removed {result.removed} orphans, "
          f"tagged {result.tagged} committed, kept {result.missing_rows} without a row")
    return 0


def _version() -> str:
    try:
        return importlib.metadata.version("medvault")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed; run from a source tree)"


def parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    top = argparse.ArgumentParser(prog="medvault", description="medvault medical-record store")
    top.add_argument("--version", action="version", version=f"medvault {_version()}")
    sub = top.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC service")
    serve.add_argument("--config", help="config file (default $MEDVAULT_HOME/config.toml)")
    # Set by the supervisor for its workers (service.supervisor); not for people.
    for hidden in ("--worker", "--ready-fd", "--supervisor-pid"):
        serve.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)
    sweep = sub.add_parser("sweep", help="remove orphaned objects left by interrupted writes")
    sweep.add_argument("--config", help="config file (default $MEDVAULT_HOME/config.toml)")
    sweep.add_argument(
        "--grace-seconds", type=int, default=3600,
        help="keep unreferenced objects younger than this, in seconds (default 3600)",
    )  # fmt: skip
    sweep.set_defaults(func=cmd_sweep)
    records_cmd.register(sub)
    studies_cmd.register(sub)
    import_cmd.register(sub)
    access_cmd.register(sub)
    audit_cmd.register(sub)
    signing_cmd.register(sub)
    keys_cmd.register(sub)
    backup_cmd.register(sub)
    restore_cmd.register(sub)
    stack_cmd.register(sub)
    stats_cmd.register(sub)
    health_cmd.register(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    logs.setup(os.environ.get("MEDVAULT_LOG_LEVEL", "INFO"))
    ns = parser().parse_args(argv)
    try:
        return int(ns.func(ns))
    except grpc.RpcError as e:
        return records_cmd.rpc_error_exit(e)
    except ConfigError as e:
        print(f"medvault: configuration: {e}", file=sys.stderr)
        return 2
    except (KeystoreError, StorageError) as e:
        # Start-up failures (token, PIN, database, object store) name what is missing.
        print(f"medvault: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        # A file the command needed (its message names it), not a bug: no traceback.
        where = f"{e.filename}: " if e.filename else ""
        print(f"medvault: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
