"""``medvault backup run|list|verify ID [--read-data]|prune``, straight from the config file.

Like ``medvault sweep`` these commands open the database, the object store and the token
themselves (no server needed). The ``[backup]`` section names the target; ``--target``,
``--bucket`` and ``--directory`` override it for one run. Progress bars (rate, ETA) are
drawn on a terminal only; elsewhere a line per phase goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from tqdm import tqdm

from keystore import Pkcs11SessionPool
from keystore.signing import Pkcs11Signer
from service.backup.targets import backup_settings, make_target
from service.cli.tables import print_table, utc
from service.config import BackupConfig, Config, ConfigError, load
from storage.backup.retention import DEFAULT_GRACE, list_backups, prune
from storage.backup.runner import BackupProgress, run_backup, source_identity
from storage.backup.verify import verify_backup
from storage.sql_metadata import make_engine


def settings(config: Config, ns: argparse.Namespace) -> BackupConfig:
    """``[backup]`` of ``config`` with the command line's overrides."""
    return backup_settings(
        config, target=getattr(ns, "target", "") or "", bucket=getattr(ns, "bucket", "") or "",
        directory=getattr(ns, "directory", "") or "",
    )  # fmt: skip


@contextmanager
def _token(config: Config) -> Iterator[Pkcs11SessionPool]:
    from service.bootstrap import keystore_config  # noqa: PLC0415  (keeps --help light)

    with Pkcs11SessionPool(keystore_config(config)) as pool:
        yield pool


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class _Bars:
    """A tqdm bar per phase on a terminal; a line per finished phase elsewhere."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._bar: tqdm[Any] | None = None
        self._phase = ""

    def __call__(self, p: BackupProgress) -> None:
        if p.phase != self._phase:
            self.close()
            self._phase = p.phase
            if self._tty:
                self._bar = tqdm(total=p.total, desc=p.phase, unit="obj", file=sys.stderr)
        if self._bar is not None:
            self._bar.n = p.done
            self._bar.set_postfix_str(_size(p.bytes), refresh=False)
            self._bar.refresh()
        elif p.done == p.total:
            print(f"{p.phase}: {p.done}/{p.total} ({_size(p.bytes)})", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def cmd_run(ns: argparse.Namespace) -> int:
    """Take one backup now."""
    from service.bootstrap import blob_store  # noqa: PLC0415

    config = load(ns.config_path)
    s = settings(config, ns)
    target = make_target(config, s)
    engine = make_engine(config.database.url)
    bars = _Bars()
    try:
        with _token(config) as pool:
            source = blob_store(config)
            result = run_backup(
                engine, source, target, Pkcs11Signer(pool, s.signing_key_label),
                source_identity(engine, source.bucket, config.s3.endpoint), progress=bars,
            )
    finally:
        bars.close()
        engine.dispose()
    c = result.counts
    print(f"backup {result.backup_id} complete in {target.describe()}: {c['records']} records, "
          f"{c['objects']} objects ({_size(c['bytes'])}), {c['audit_events']} audit events; "
          f"copied {result.copied_objects} objects ({_size(result.copied_bytes)})")
    return 0


def cmd_list(ns: argparse.Namespace) -> int:
    """Complete backups, newest first."""
    config = load(ns.config_path)
    target = make_target(config, settings(config, ns))
    rows = [
        (b.id, b.trigger, utc(b.completed_at), b.records, b.objects, _size(b.bytes),
         b.copied_objects, _size(b.copied_bytes))
        for b in list_backups(target)
    ]
    headers = ("ID", "TRIGGER", "COMPLETED", "RECORDS", "OBJECTS", "SIZE", "COPIED", "COPIED SIZE")
    if print_table(headers, rows, numeric=(3, 4, 5, 6, 7)) == 0:
        print(f"no complete backups in {target.describe()}")
    return 0


def _trusted_key(path: str) -> bytes:
    data = Path(path).read_bytes()
    try:
        key = (serialization.load_pem_public_key(data) if data.lstrip().startswith(b"-----")
               else serialization.load_der_public_key(data))
    except ValueError as e:
        raise ConfigError(f"--trusted-key {path}: not a public key") from e
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def cmd_verify(ns: argparse.Namespace) -> int:
    """Check a backup's signature and files; non-zero exit on any failure."""
    config = load(ns.config_path)
    s = settings(config, ns)
    target = make_target(config, s)
    if ns.trusted_key:
        trusted = _trusted_key(ns.trusted_key)
    else:
        with _token(config) as pool:
            trusted = Pkcs11Signer(pool, s.signing_key_label).public_key_der()
    bars = _Bars()
    try:
        report = verify_backup(target, ns.id, trusted_public_key=trusted,
                               read_data=ns.read_data, progress=bars)
    finally:
        bars.close()
    print(f"backup {report.backup_id}: signature {'valid' if report.signature_ok else 'INVALID'}; "
          f"{report.objects_checked} objects checked"
          + (f", {_size(report.bytes_read)} read and hashed" if report.read_data
             else " (presence and size; --read-data hashes every byte)"))
    if report.failures:
        print_table(("FILE / RECORD OBJECT", "PROBLEM"),
                    [(f.key, f.problem) for f in report.failures])
    print("OK" if report.ok else f"FAILED: {len(report.failures)} problem(s)")
    return 0 if report.ok else 1


def cmd_prune(ns: argparse.Namespace) -> int:
    """Apply the retention policy."""
    config = load(ns.config_path)
    s = settings(config, ns)
    target = make_target(config, s)
    result = prune(
        target,
        s.keep_daily if ns.keep_daily is None else ns.keep_daily,
        s.keep_weekly if ns.keep_weekly is None else ns.keep_weekly,
        s.keep_monthly if ns.keep_monthly is None else ns.keep_monthly,
        grace=timedelta(hours=ns.grace_hours), dry_run=ns.dry_run,
    )
    verb = "would remove" if ns.dry_run else "removed"
    print(f"kept {len(result.kept)} backups, {verb} {len(result.removed)}: "
          + (", ".join(result.removed) or "none"))
    print(f"{verb} {result.objects_removed} objects ({_size(result.bytes_removed)}) and "
          f"{result.leftovers_removed} leftover files")
    if result.objects_deferred:
        print("objects left in place: a backup is running (or a manifest is unreadable)")
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config file (default $MEDVAULT_HOME/config.toml)")
    parser.add_argument("--target", choices=("s3", "directory"), help="override [backup] target")
    parser.add_argument("--bucket", help="override [backup] bucket")
    parser.add_argument("--directory", help="override [backup] directory")


def register(sub: Any) -> None:
    """Add ``backup`` and its sub-commands to the ``medvault`` parser."""
    backup = sub.add_parser("backup", help="take, list, verify and prune backups")
    commands = backup.add_subparsers(dest="backup_command", required=True)
    run = commands.add_parser("run", help="take one backup now")
    run.set_defaults(func=_with_config(cmd_run))
    listing = commands.add_parser("list", help="complete backups, newest first")
    listing.set_defaults(func=_with_config(cmd_list))
    verify = commands.add_parser("verify", help="check a backup's signature and every file")
    verify.add_argument("id", help="backup id (see `medvault backup list`)")
    verify.add_argument("--read-data", action="store_true", help="hash every byte (slow)")
    verify.add_argument("--trusted-key", help="PEM/DER public key file (offline verification)")
    verify.set_defaults(func=_with_config(cmd_verify))
    pruning = commands.add_parser("prune", help="remove backups the retention policy drops")
    for rule in ("daily", "weekly", "monthly"):
        pruning.add_argument(f"--keep-{rule}", type=int, help=f"override [backup] keep_{rule}")
    pruning.add_argument("--grace-hours", type=float,
                         default=DEFAULT_GRACE.total_seconds() / 3600,
                         help="age before an unreferenced leftover is removed (default 24)")
    pruning.add_argument("--dry-run", action="store_true", help="show, remove nothing")
    pruning.set_defaults(func=_with_config(cmd_prune))
    for parser in (run, listing, verify, pruning):
        _common(parser)


def _with_config(fn: Any) -> Any:
    """Resolve ``--config`` the way ``medvault`` does before running ``fn``."""
    def wrapped(ns: argparse.Namespace) -> int:
        from service.cli.main import _config_path  # noqa: PLC0415  (import cycle)

        ns.config_path = _config_path(ns)
        return int(fn(ns))

    return wrapped
