"""``medvault backup run|list|verify ID [--read-data]|prune|public-key``: BackupService calls.

Each command is a gRPC call made with the caller's own certificate (``--cert``/``--key``
or ``MEDVAULT_CERT``/``MEDVAULT_KEY``, as every other command), so the service
authorises it (``backup_operator``) and audits it under that person's name. Nothing
from the server's machine is needed: no PIN file, no database, no config file. The
target, retention and signing key are the service's ``[backup]`` section.

Long calls stream progress: a bar per phase (rate, ETA) on a terminal, one line per
finished phase elsewhere; byte counts are human-readable (KiB, MiB, GiB).

``verify ID --trusted-key FILE --config CONFIG`` is the one local mode: an auditor's
offline check of a target with a public key, reading the target named by a config file
(its credentials only; no token, no database, no service, and so no audit event).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from tqdm import tqdm

from service._gen.medvault.v1 import backup_pb2 as bpb
from service._gen.medvault.v1 import backup_pb2_grpc as bpb_grpc
from service.cli.client import add_connection_flags, channel
from service.cli.options import config_path
from service.cli.tables import print_table, utc
from service.config import BackupConfig, Config, ConfigError

# Unary calls get a deadline; the streams (backup, verify, drill) run as long as they must.
TIMEOUT = 120


def human_size(n: float) -> str:
    """``512 B``, ``1.5 KiB``, ``3.2 MiB``, ``1.0 GiB``, ``2.0 TiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def stub(ns: argparse.Namespace) -> bpb_grpc.BackupServiceStub:
    """A BackupService stub on the channel the connection flags describe."""
    return bpb_grpc.BackupServiceStub(channel(ns))


class ProgressLike(Protocol):
    """A ``medvault.v1.Progress`` message (or anything shaped like one)."""

    phase: str
    done: int
    total: int
    bytes_done: int


class Bars:
    """A tqdm bar per phase on a terminal; one line per finished phase elsewhere."""

    def __init__(self, quiet: bool = False) -> None:
        self._tty = sys.stderr.isatty()
        self._quiet = quiet
        self._bar: tqdm[Any] | None = None
        self._phase = ""
        self._printed: set[str] = set()

    def __call__(self, p: ProgressLike) -> None:
        if self._quiet:
            return
        if p.phase != self._phase:
            self.close()
            self._phase = p.phase
            if self._tty:
                self._bar = tqdm(total=p.total, desc=p.phase, unit="obj", file=sys.stderr)
        if self._bar is not None:
            self._bar.total = max(self._bar.total or 0, p.total)
            self._bar.n = p.done
            self._bar.set_postfix_str(human_size(p.bytes_done), refresh=False)
            self._bar.refresh()
        elif p.done >= p.total and p.phase not in self._printed:
            self._printed.add(p.phase)  # once per phase, with its final size
            print(f"{p.phase}: {p.done}/{p.total} ({human_size(p.bytes_done)})",
                  file=sys.stderr)  # fmt: skip

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def follow(stream: Iterable[Any], result_field: str, bars: Bars) -> Any:
    """Draw a stream's ``progress`` messages; return its ``result_field`` message."""
    result = None
    try:
        for message in stream:
            if message.WhichOneof("message") == "progress":
                bars(message.progress)
            else:
                result = getattr(message, result_field)
    finally:
        bars.close()
    if result is None:
        raise SystemExit("medvault: the service ended the call without a result; "
                         "see the service's log")  # fmt: skip
    return result


def cmd_run(ns: argparse.Namespace) -> int:
    """Take one backup now, through the service."""
    s = follow(stub(ns).RunBackup(bpb.RunBackupRequest()), "result", Bars(ns.quiet))
    print(f"backup {s.id} complete: {s.records} records, {s.objects} objects "
          f"({human_size(s.bytes)}); copied {s.objects_copied} objects "
          f"({human_size(s.bytes_copied)})")  # fmt: skip
    return 0


def cmd_list(ns: argparse.Namespace) -> int:
    """Complete backups, newest first."""
    reply = stub(ns).ListBackups(bpb.ListBackupsRequest(), timeout=TIMEOUT)
    rows = [
        (b.id, b.trigger, utc(b.completed_at), b.records, b.objects,
         human_size(b.bytes), b.objects_copied, human_size(b.bytes_copied))
        for b in reply.backups
    ]  # fmt: skip
    headers = ("ID", "TRIGGER", "COMPLETED", "RECORDS", "OBJECTS", "SIZE", "COPIED", "COPIED SIZE")
    if print_table(headers, rows, numeric=(3, 4, 5, 6, 7)) == 0:
        print("no complete backups in the service's backup target")
    return 0


def trusted_key(path: str) -> bytes:
    """The DER SubjectPublicKeyInfo of a PEM or DER public key file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"--trusted-key {path}: {e.strerror or e}") from e
    try:
        key = (serialization.load_pem_public_key(data) if data.lstrip().startswith(b"-----")
               else serialization.load_der_public_key(data))  # fmt: skip
    except ValueError as e:
        raise ConfigError(f"--trusted-key {path}: not a public key") from e
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _print_verify(r: bpb.VerifyReport, read_data: bool) -> int:
    print(f"backup {r.id}: signature {'valid' if r.manifest_signature_valid else 'INVALID'}; "
          f"{r.objects_checked} objects checked"
          + (f", {human_size(r.bytes_checked)} read and hashed" if read_data
             else " (presence and size; --read-data hashes every byte)"))  # fmt: skip
    if r.seconds:
        print(f"took {r.seconds:.2f} s: {r.objects_per_second:.1f} objects/s"
              + (f", {human_size(r.bytes_per_second)}/s" if read_data else ""))  # fmt: skip
    if r.failures:
        print_table(("FILE / RECORD OBJECT", "PROBLEM"), [_two(line) for line in r.failures])
    print("OK" if r.ok else f"FAILED: {len(r.failures)} problem(s)")
    return 0 if r.ok else 1


def _two(line: str) -> tuple[str, str]:
    """``key: problem`` as two columns."""
    key, _, problem = line.partition(": ")
    return (key, problem) if problem else ("", key)


def cmd_verify(ns: argparse.Namespace) -> int:
    """Check a backup's signature and files; non-zero exit on any failure."""
    if ns.trusted_key:
        return _verify_offline(ns)
    request = bpb.VerifyBackupRequest(id=ns.id, read_data=ns.read_data)
    r = follow(stub(ns).VerifyBackup(request), "report", Bars(ns.quiet))
    return _print_verify(r, ns.read_data)


def _offline_settings(ns: argparse.Namespace) -> tuple[Config, BackupConfig]:
    # Importing service.backup loads the backup use cases (signing, parsers): seconds of
    # CPU that only this local command needs, not every `medvault` invocation.
    from service.backup.targets import backup_settings  # noqa: PLC0415
    from service.config import load  # noqa: PLC0415

    config = load(config_path(ns))
    return config, backup_settings(
        config, target=ns.target or "", bucket=ns.bucket or "", directory=ns.directory or ""
    )


def _verify_offline(ns: argparse.Namespace) -> int:
    """Verify against a public key, reading the target directly (no token, no service)."""
    from service.backup.targets import make_target  # noqa: PLC0415  (storage clients)
    from storage import verify_backup  # noqa: PLC0415

    trusted = trusted_key(ns.trusted_key)
    config, s = _offline_settings(ns)
    bars = Bars(ns.quiet)
    report = verify_backup(make_target(config, s), ns.id, trusted_public_key=trusted,
                           read_data=ns.read_data, progress=_LocalProgress(bars))  # fmt: skip
    bars.close()
    return _print_verify(bpb.VerifyReport(
        id=report.backup_id, ok=report.ok, manifest_signature_valid=report.signature_ok,
        objects_checked=report.objects_checked, bytes_checked=report.bytes_read,
        failures=[f"{f.key}: {f.problem}" for f in report.failures], seconds=report.seconds,
        bytes_per_second=report.bytes_per_second, objects_per_second=report.objects_per_second,
    ), ns.read_data)  # fmt: skip


class _LocalProgress:
    """Adapts the storage layer's progress reports to :class:`Bars`."""

    def __init__(self, bars: Bars) -> None:
        self._bars = bars

    def __call__(self, p: Any) -> None:
        self._bars(bpb.Progress(phase=p.phase, done=p.done, total=p.total, bytes_done=p.bytes))


def cmd_prune(ns: argparse.Namespace) -> int:
    """Apply the retention policy, through the service."""
    request = bpb.PruneBackupsRequest(dry_run=ns.dry_run)
    for rule in ("keep_daily", "keep_weekly", "keep_monthly", "grace_hours"):
        if getattr(ns, rule) is not None:
            setattr(request, rule, getattr(ns, rule))
    r = stub(ns).PruneBackups(request, timeout=None)  # a large target takes a while
    verb = "would remove" if r.dry_run else "removed"
    print(f"kept {len(r.kept)} backups, {verb} {len(r.removed)}: "
          + (", ".join(r.removed) or "none"))
    print(f"{verb} {r.objects_removed} objects ({human_size(r.bytes_removed)}) and "
          f"{r.leftovers_removed} leftover files")
    if r.objects_deferred:
        print("objects left in place: a backup is running (or a manifest is unreadable)")
    return 0


def cmd_public_key(ns: argparse.Namespace) -> int:
    """Write the manifest-signing public key (PEM) to stdout or ``-o FILE``."""
    reply = stub(ns).GetBackupPublicKey(bpb.GetBackupPublicKeyRequest(), timeout=TIMEOUT)
    if ns.output:
        try:
            Path(ns.output).write_text(reply.public_key_pem)
        except OSError as e:
            raise ConfigError(f"-o {ns.output}: {e.strerror or e}") from e
        print(f"{reply.key_label} ({reply.algorithm}) public key written to {ns.output}",
              file=sys.stderr)  # fmt: skip
    else:
        sys.stdout.write(reply.public_key_pem)
    return 0


def _non_negative(text: str) -> int:
    from service.cli.options import non_negative_int  # noqa: PLC0415, config_path

    return non_negative_int(text)


def register(sub: Any) -> None:
    """Add ``backup`` and its sub-commands to the ``medvault`` parser."""
    backup = sub.add_parser(
        "backup", help="take, list, verify and prune backups (BackupService, as yourself)"
    )
    commands = backup.add_subparsers(dest="backup_command", required=True)
    run = commands.add_parser("run", help="take one backup now")
    run.set_defaults(func=cmd_run)
    listing = commands.add_parser("list", help="complete backups, newest first")
    listing.set_defaults(func=cmd_list)
    verify = commands.add_parser("verify", help="check a backup's signature and every file")
    verify.add_argument("id", help="backup id (see `medvault backup list`)")
    verify.add_argument("--read-data", action="store_true", help="hash every byte (slow)")
    verify.add_argument(
        "--trusted-key", metavar="FILE",
        help="offline: verify against this PEM/DER public key (`medvault backup public-key`), "
        "reading the target named by --config directly; runs locally, not audited",
    )  # fmt: skip
    verify.add_argument("--config", help="offline only: config whose [backup] names the "
                        "target (default $MEDVAULT_HOME/config.toml)")  # fmt: skip
    verify.add_argument("--target", choices=("s3", "directory"),
                        help="offline only: override [backup] target")  # fmt: skip
    verify.add_argument("--bucket", help="offline only: override [backup] bucket")
    verify.add_argument("--directory", help="offline only: override [backup] directory")
    verify.set_defaults(func=cmd_verify)
    pruning = commands.add_parser("prune", help="remove backups the retention policy drops")
    for rule in ("daily", "weekly", "monthly"):
        pruning.add_argument(f"--keep-{rule}", type=_non_negative, metavar="N",
                             help=f"keep the newest backup of each of the last N {rule} "
                             f"periods (default: the service's [backup] keep_{rule})")  # fmt: skip
    pruning.add_argument("--grace-hours", type=float, metavar="HOURS",
                         help="age before an unreferenced leftover of a killed run is "
                         "removed (default 24)")  # fmt: skip
    pruning.add_argument("--dry-run", action="store_true", help="show, remove nothing")
    pruning.set_defaults(func=cmd_prune)
    key = commands.add_parser(
        "public-key", help="export the manifest-signing public key (PEM) for offline checks"
    )
    key.add_argument("-o", "--output", metavar="FILE", help="write here (default stdout)")
    key.set_defaults(func=cmd_public_key)
    for parser in (run, verify):
        parser.add_argument("--quiet", action="store_true", help="no progress output")
    for parser in (run, listing, verify, pruning, key):
        add_connection_flags(parser)
