"""``medvault restore-drill ID`` and ``medvault restore ID --into CONFIG [--force]``.

Like ``medvault sweep`` and ``medvault backup``, both work straight from config files
(no server needed). The backup target is the ``[backup]`` section of ``--config``
(``--target``, ``--bucket``, ``--directory`` override it). Both need the token: the
master keys (KEKs) never leave it, so a backup is only restorable with the token's own
backup (docs/operations.md).

* ``restore-drill`` restores into a scratch bucket (random name, on the configured S3)
  and a scratch database (a temporary SQLite file, or a new database on the PostgreSQL
  server ``--scratch-database`` names), checks every record, writes the signed report
  and an audit event, removes the scratch place. Exit 1 on any failure.
* ``restore`` restores into the deployment ``--into`` describes (its bucket, database
  and token); it refuses a target holding any record or object unless ``--force``.
"""

from __future__ import annotations

import argparse
import getpass
import socket
from typing import Any

from keystore import Pkcs11KeyWrapper, Pkcs11SessionPool
from keystore.signing import Pkcs11Signer
from service.backup.targets import make_target
from service.cli.backup_cmd import _Bars, _trusted_key, settings
from service.cli.tables import print_table
from service.config import Config, ConfigError, load, read_secret
from storage.backup.drill import DrillReport
from storage.backup.restore import Deployment, restore, s3_scratch
from storage.s3_blobs import make_minio_client
from storage.sql_metadata import make_engine, upgrade


def _config_path(ns: argparse.Namespace) -> str:
    from service.cli.main import _config_path as default_path  # noqa: PLC0415  (cycle)

    return default_path(ns)


def _operator() -> str:
    """Who ran the command, for the audit event (the OS account at this console)."""
    try:
        return f"console:{getpass.getuser()}"
    except (KeyError, OSError):
        return "console"


def _print_report(report: DrillReport) -> None:
    doc = report.document
    verified = doc.get("verified", {})
    print(f"drill of backup {report.backup_id}: {'PASSED' if report.ok else 'FAILED'}")
    print(f"recovery time {report.recovery_seconds:.2f} s; {verified.get('records', 0)} "
          f"records, {verified.get('bytes', 0)} bytes, {verified.get('signatures', 0)} "
          "signatures verified")  # fmt: skip
    chain = doc.get("audit_chain")
    if chain:
        print(f"audit chain: {chain['reason']} ({chain['events_checked']} events, "
              f"{chain['checkpoints_checked']} checkpoints)")  # fmt: skip
    if report.failures:
        rows = [(f.check, f.record_id and f"{f.record_id} v{f.version}", f.object_key, f.detail)
                for f in report.failures]  # fmt: skip
        print_table(("CHECK", "RECORD", "OBJECT", "PROBLEM"), rows)
    print(f"signed report: {report.key}")


def _scratch_client(config: Config) -> Any:
    s3 = config.s3
    return make_minio_client(
        s3.endpoint,
        read_secret(s3.access_key_env, s3.access_key_file),
        read_secret(s3.secret_key_env, s3.secret_key_file),
        secure=s3.secure,
        ca_file=s3.ca_file or None,
    )


def cmd_drill(ns: argparse.Namespace) -> int:
    """Restore into a scratch place, verify every record, report; exit 1 on any failure."""
    from service.backup.drill import audited_drill, drill_checks  # noqa: PLC0415
    from service.bootstrap import build  # noqa: PLC0415
    from service.signing.validation import SignatureValidator  # noqa: PLC0415
    from storage.backup.drill import DrillRequest  # noqa: PLC0415

    config = load(_config_path(ns))
    s = settings(config, ns)
    target = make_target(config, s)
    scratch = s3_scratch(_scratch_client(config), ns.scratch_database or None)
    components = build(config)  # the live deployment's token and audit trail
    bars = _Bars()
    try:
        trust = SignatureValidator(_anchors(config))
        checks = drill_checks(
            components.pool, trust, audit_key_label=config.audit.signing_key_label,
            backup_key_label=s.signing_key_label,
        )  # fmt: skip
        report = audited_drill(
            DrillRequest(target, ns.id, scratch, bars), checks,
            audit=components.guard.trail.record, principal=_operator(),
            role="backup_operator", source=socket.gethostname(),
        )  # fmt: skip
    finally:
        bars.close()
        components.close()
    _print_report(report)
    return 0 if report.ok else 1


def _anchors(config: Config) -> list[bytes]:
    """The ``[signing] trust_anchors`` certificates the record signatures must chain to."""
    from service.signing.validation import load_pem_certificates  # noqa: PLC0415

    try:
        return load_pem_certificates(config.signing.trust_anchors)
    except ValueError as e:
        raise ConfigError(f"[signing] trust_anchors: {e}") from e


def cmd_restore(ns: argparse.Namespace) -> int:
    """Restore a backup into the (empty) deployment ``--into`` describes."""
    from service.bootstrap import blob_store, keystore_config  # noqa: PLC0415

    source = load(_config_path(ns))
    into = load(ns.into)
    s = settings(source, ns)
    target = make_target(source, s)
    engine = make_engine(into.database.url)
    bars = _Bars()
    try:
        upgrade(engine)
        with Pkcs11SessionPool(keystore_config(into)) as pool:
            trusted = (_trusted_key(ns.trusted_key) if ns.trusted_key
                       else Pkcs11Signer(pool, s.signing_key_label).public_key_der())  # fmt: skip
            result = restore(
                target, ns.id, Deployment(engine, blob_store(into)),
                keks=Pkcs11KeyWrapper(pool), token_label=pool.config.token_label,
                trusted_public_key=trusted, force=ns.force, strict=True, progress=bars,
            )  # fmt: skip
    finally:
        bars.close()
        engine.dispose()
    counts = ", ".join(f"{n} {name}" for name, n in sorted(result.tables.items()))
    print(f"backup {ns.id} restored into {into.s3.bucket} and the database of {ns.into}: "
          f"{result.objects} objects ({result.bytes} bytes); rows: {counts}")  # fmt: skip
    print("counts match the manifest; start the service on that config, then run "
          "`medvault audit verify` and a drill of the next backup")  # fmt: skip
    return 0


def _target_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config whose [backup] names the target "
                        "(default $MEDVAULT_HOME/config.toml)")  # fmt: skip
    parser.add_argument("--target", choices=("s3", "directory"), help="override [backup] target")
    parser.add_argument("--bucket", help="override [backup] bucket")
    parser.add_argument("--directory", help="override [backup] directory")


def register(sub: Any) -> None:
    """Add ``restore-drill`` and ``restore`` to the ``medvault`` parser."""
    drill = sub.add_parser("restore-drill", help="restore a backup into scratch and verify it all")
    drill.add_argument("id", help="backup id (see `medvault backup list`)")
    drill.add_argument("--scratch-database", default="",
                       help="PostgreSQL URL of a server to create the scratch database on "
                       "(default: a temporary SQLite file)")  # fmt: skip
    _target_flags(drill)
    drill.set_defaults(func=cmd_drill)
    real = sub.add_parser("restore", help="restore a backup into a new, empty deployment")
    real.add_argument("id", help="backup id (see `medvault backup list`)")
    real.add_argument("--into", required=True, help="config file of the deployment to fill")
    real.add_argument("--force", action="store_true",
                      help="overwrite a target that already holds records or objects")  # fmt: skip
    real.add_argument("--trusted-key", help="PEM/DER backup public key (else the token's)")
    _target_flags(real)
    real.set_defaults(func=cmd_restore)
