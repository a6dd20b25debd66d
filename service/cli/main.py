"""The ``medvault`` command."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keystore import KeystoreError
from service import logs
from storage import StorageError

if TYPE_CHECKING:
    from service.config import Config


def _config(ns: argparse.Namespace) -> tuple[str, Config]:
    """The config file the flags name and its settings (imported here: client commands
    need neither the config schema nor the protobuf messages the options module uses)."""
    from service.cli.options import config_path  # noqa: PLC0415
    from service.config import load  # noqa: PLC0415

    path = config_path(ns)
    return path, load(path)


def cmd_serve(ns: argparse.Namespace) -> int:
    """Run the gRPC service in the foreground: in this process, or supervised workers."""
    path, config = _config(ns)
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

    components = build(_config(ns)[1])
    try:
        result = sweep_orphans(
            components.blobs,
            components.metadata,
            timedelta(seconds=ns.grace_seconds),
            on_missing_row=components.missing_row,
        )  # every referenced object's tag is checked: backfill=None
    finally:
        components.close()
    print(
        f"scanned {result.scanned} objects, removed {result.removed} orphans, "
        f"tagged {result.tagged} committed, kept {result.missing_rows} without a row"
    )
    return 0


def _version() -> str:
    import importlib.metadata  # noqa: PLC0415  (50 ms, only for --version)

    try:
        return importlib.metadata.version("medvault")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed; run from a source tree)"


class _VersionAction(argparse.Action):
    """``--version``: the installed version, looked up only when asked for."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:  # fmt: skip
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:  # fmt: skip
        sys.stdout.write(f"medvault {_version()}\n")
        parser.exit()


# Every top-level command with the module (under service.cli) that registers it and its
# one-line help. A command line imports only the module of the command it names; the
# others are listed by name and help (`medvault --help` imports none of them: gRPC, the
# protobuf messages and the local stack's machinery cost every command a third of a
# second). tests/unit/service/test_cli_commands.py keeps this equal to what the modules
# register.
COMMANDS: dict[str, tuple[str, str]] = {
    "put": ("records_cmd", "store files as records (folders: every file under them)"),
    "get": ("records_cmd", "fetch a record's content"),
    "stat": ("records_cmd", "show a record's metadata"),
    "ls": ("records_cmd", "list a patient's records"),
    "studies": ("studies_cmd", "list a patient's imaging studies, or save one"),
    "import-dicom": ("import_cmd", "import a folder of DICOM files or a patient CD (DICOMDIR)"),
    "access": ("access_cmd", "care-team grants and break-the-glass"),
    "whoami": ("access_cmd", "your principal, roles and permissions"),
    "audit": ("audit_cmd", "security officer's tools over the audit trail"),
    "sign": ("signing_cmd", "sign a record with your signer's token key"),
    "verify": ("signing_cmd", "verify every signature of a record"),
    "signature": ("signing_cmd", "export a signature as a .p7s file"),
    "keys": ("keys_cmd", "token keys, signers and certificates"),
    "backup": ("backup_cmd", "take, list, verify and prune backups (BackupService, as yourself)"),
    "restore-drill": (
        "restore_cmd",
        "have the service restore a backup into scratch and verify it all",
    ),
    "restore": ("restore_cmd", "restore a backup into a new, empty deployment (runs locally)"),
    "stack": ("stack_cmd", "run the local development stack"),
    "stats": ("stats_cmd", "SDMX-HD statistics: de-identified monthly counts"),
    "health": ("health_cmd", "check the service's gRPC health (exit 0 when serving)"),
}


def _named_command(argv: Sequence[str]) -> str | None:
    """The command an argument list names: its first argument that is not an option."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser. Without ``argv``, every command's full parser; with it, the
    full parser of the command ``argv`` names only, the others by name and help."""
    top = argparse.ArgumentParser(prog="medvault", description="medvault medical-record store")
    top.add_argument("--version", action=_VersionAction, help="show the version and exit")
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
    wanted = None if argv is None else _named_command(argv)
    full = {module for name, (module, _) in COMMANDS.items() if argv is None or name == wanted}
    for name, (module, text) in COMMANDS.items():
        if name in sub.choices:
            continue  # registered with another command of its module
        if module in full:
            importlib.import_module(f"service.cli.{module}").register(sub)
        else:
            sub.add_parser(name, help=text, add_help=False)
    return top


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    logs.setup(os.environ.get("MEDVAULT_LOG_LEVEL", "INFO"))
    args = sys.argv[1:] if argv is None else argv
    ns = parser(args).parse_args(args)
    try:
        return int(ns.func(ns))
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        code = _failure_exit(e)
        if code is None:
            raise
        return code


def _failure_exit(e: Exception) -> int | None:
    """The exit status of a failure the user can act on, after one line saying why; None
    for a bug (its traceback is shown). Modules a command never imported cannot have
    raised, so their error classes are looked up only if loaded (the CLI starts faster)."""
    grpc = sys.modules.get("grpc")  # a command that made a call has imported it
    if grpc is not None and isinstance(e, grpc.RpcError):
        from service.cli.records_cmd import rpc_error_exit  # noqa: PLC0415

        return rpc_error_exit(e)
    config = sys.modules.get("service.config")
    if config is not None and isinstance(e, config.ConfigError):
        print(f"medvault: configuration: {e}", file=sys.stderr)
        return 2
    if isinstance(e, (KeystoreError, StorageError)):
        # Start-up failures (token, PIN, database, object store) name what is missing.
        print(f"medvault: {e}", file=sys.stderr)
        return 1
    if isinstance(e, OSError):
        # A file the command needed (its message names it), not a bug: no traceback.
        where = f"{e.filename}: " if e.filename else ""
        print(f"medvault: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    return None
