"""``medvault restore-drill ID`` (a BackupService call) and ``medvault restore ID --into``.

* ``restore-drill`` asks the service to restore the backup into a scratch place (a random
  bucket on its S3, and a temporary SQLite file or a new database on the PostgreSQL
  server of its ``[backup] drill_database``), check every record, write the signed
  report and remove the scratch place. It is made with the caller's certificate and
  audited under that name; progress streams to the terminal. Exit 1 on any failure; an
  id with no complete backup is refused (NOT_FOUND) and no report is written.
* ``restore`` runs **locally**: it fills a new deployment that has no running service
  yet, from config files (the backup target from ``--config``'s ``[backup]``, the
  deployment's bucket, database and token from ``--into``). It refuses a target holding
  any record or object unless ``--force``, and writes its own audit event
  (``backup.restore``, principal ``console:<OS user>``) into the deployment it restored.
  Restored under another record bucket's name, it first copies the grant revocation
  markers of the deployment backed up (``service.write_once.MarkerCarry``; from
  ``--markers-from``, default ``--config``) under the new name, before any row loads;
  a backup with revoked grants none of which has a marker there is refused before
  anything is written (the markers are looked for in the wrong place).
  The master keys (KEKs) never leave the token, so only a deployment with the token's
  own backup can be restored into (docs/operations.md).
"""

from __future__ import annotations

import argparse
import getpass
import logging
import socket
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from service._gen.medvault.v1 import backup_pb2 as bpb
from service.cli.backup_cmd import Bars, follow, human_size, stub, trusted_key
from service.cli.client import add_connection_flags
from service.cli.options import config_path
from service.cli.tables import print_table

if TYPE_CHECKING:
    from minio import Minio

    from service.config import Config
    from service.write_once import MarkerCarry

RESTORE_ACTION = "backup.restore"


def console_principal() -> str:
    """Who ran a local command, for its audit event (the OS account at this console)."""
    try:
        return f"console:{getpass.getuser()}"
    except (KeyError, OSError):
        return "console"


def quiet_migrations() -> None:
    """Alembic's INFO lines ("Running upgrade ...") are not for the operator's terminal."""
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _print_report(r: bpb.DrillReport, key: str) -> None:
    kind = "SAMPLED drill" if r.sampled else "full drill"
    print(f"{kind} of backup {r.backup_id}: {'PASSED' if r.ok else 'FAILED'}")
    print(f"recovery time {r.recovery_seconds:.2f} s; {r.records_verified} records checked, "
          f"{r.records_decrypted} decrypted ({human_size(r.bytes_verified)}), "
          f"{r.signatures_verified} signatures verified")  # fmt: skip
    print(f"throughput {human_size(r.bytes_per_second)}/s, {r.records_per_second:.1f} "
          f"records/s ({r.workers} workers)")  # fmt: skip
    if r.sampled:
        print(f"sample: {r.sample_size} of {r.population} records decrypted, chosen for "
              f"confidence {r.sample_confidence:g} of finding a defect rate of "
              f"{r.max_defect_rate:g} or more; every manifest entry and metadata row checked")
        print(f"seed {r.seed} (repeat this sample with --seed {r.seed})")  # fmt: skip
    print(f"audit chain: {'ok' if r.audit_chain_ok else 'BROKEN'}")
    if r.failures:
        print_table(("PROBLEM",), [(line,) for line in r.failures])
    if key:
        print(f"signed report: {key}")


def cmd_drill(ns: argparse.Namespace) -> int:
    """Restore into a scratch place, verify every record, report; exit 1 on any failure."""
    request = bpb.RunRestoreDrillRequest(
        id=ns.id, sample_confidence=ns.sample_confidence or 0.0,
        max_defect_rate=ns.max_defect_rate or 0.0, seed=ns.seed or "",
    )  # fmt: skip
    report = follow(stub(ns).RunRestoreDrill(request), "report", Bars(ns.quiet))
    _print_report(report, report.report_key)
    return 0 if report.ok else 1


def cmd_restore(ns: argparse.Namespace) -> int:
    """Restore a backup into the (empty) deployment ``--into`` describes (locally)."""
    from keystore import (  # noqa: PLC0415
        Pkcs11BlindIndexer,
        Pkcs11KeyWrapper,
        Pkcs11SessionPool,
        Pkcs11Signer,
    )
    from service.backup.targets import backup_settings, make_target  # noqa: PLC0415
    from service.bootstrap import blob_store, keystore_config, s3_client  # noqa: PLC0415
    from service.config import load  # noqa: PLC0415
    from storage import (  # noqa: PLC0415
        Deployment,
        GrantSealer,
        make_engine,
        read_manifest,
        restore,
        upgrade,
    )

    quiet_migrations()
    source = load(config_path(ns))
    into = load(ns.into)
    s = backup_settings(source, target=ns.target or "", bucket=ns.bucket or "",
                        directory=ns.directory or "")  # fmt: skip
    target = make_target(source, s)
    into_client = s3_client(into)
    blobs = blob_store(into, into_client)
    engine = make_engine(into.database.url)
    bars = Bars()
    progress = _storage_progress(bars)
    try:
        upgrade(engine)
        with Pkcs11SessionPool(keystore_config(into)) as pool:
            trusted = (trusted_key(ns.trusted_key) if ns.trusted_key
                       else Pkcs11Signer(pool, s.signing_key_label).public_key_der())  # fmt: skip
            backed_up = read_manifest(target, ns.id, trusted).source.bucket
            carry, in_place = _carry(ns, source, into, into_client, backed_up)
            sealer = GrantSealer(Pkcs11BlindIndexer(pool))
            result = restore(
                target, ns.id, Deployment(engine, blobs),
                keks=Pkcs11KeyWrapper(pool), token_label=pool.config.token_label,
                trusted_public_key=trusted, force=ns.force, strict=True, progress=progress,
                before_load=carry.copy if carry is not None else None,
                before_write=(lambda rows: carry.check_revoked(rows, sealer))
                if carry is not None else None,
                named_grants=carry.marked if carry is not None else frozenset(),
            )  # fmt: skip
        bars.close()
        counts = ", ".join(f"{n} {name}" for name, n in sorted(result.tables.items()))
        markers = _markers_line(carry, in_place)
        record_local_event(
            engine, RESTORE_ACTION, f"backup/{ns.id}",
            f"restored from {target.describe()}{' (--force)' if ns.force else ''}: "
            f"{result.objects} objects, {result.bytes} bytes; rows: {counts}; {markers}",
        )  # fmt: skip
    finally:
        bars.close()
        engine.dispose()
    print(f"backup {ns.id} restored into {into.s3.bucket} and the database of {ns.into}: "
          f"{result.objects} objects ({human_size(result.bytes)}); rows: {counts}")  # fmt: skip
    print(markers)
    print("counts match the manifest; an audit event (backup.restore) records the restore. "
          "Start the service on that config, then run `medvault audit verify` and a drill "
          "of the next backup")  # fmt: skip
    return 0


def _carry(ns: argparse.Namespace, source: Config, into: Config, into_client: Minio,
           backed_up: str) -> tuple[MarkerCarry | None, bool]:  # fmt: skip
    """The carry of the markers kept under record bucket name ``backed_up`` (the
    manifest's source), checked (the old ones listed), and whether they are read in
    place (then no carry). ``--without-revocation-markers`` goes without them only when
    none can be read: with any there, it is refused (cold review 11d)."""
    from service.bootstrap import s3_client  # noqa: PLC0415
    from service.config import load  # noqa: PLC0415
    from service.write_once import marker_carry  # noqa: PLC0415
    from storage import RevocationMarkerError  # noqa: PLC0415

    origin = load(ns.markers_from) if ns.markers_from else source
    named = (f"--markers-from {ns.markers_from}" if ns.markers_from
             else f"--config {config_path(ns)}")  # fmt: skip
    try:
        carry = marker_carry(origin, s3_client(origin), into, into_client, backed_up,
                             origin=named)  # fmt: skip
    except RevocationMarkerError:
        if ns.without_revocation_markers:
            return None, False
        raise
    if carry is None:
        return None, True  # read in place: --without-revocation-markers loses nothing
    if not ns.without_revocation_markers:
        carry.check()
        return carry, False
    try:
        found = carry.check()
    except RevocationMarkerError:
        found = 0
    if not found:
        return None, False  # none there to read: restored without them, as the flag says
    # The flag is for markers lost with the old deployment; there, going without them
    # would make every grant revoked after the backup active again (cold review 11d).
    raise RevocationMarkerError(
        f"--without-revocation-markers, but {found} grant revocation marker(s) of the "
        f"deployment backed up can be read at {carry.source.describe()}; nothing was "
        "restored. Run the restore again without --without-revocation-markers: they are "
        "carried over"
    )


def _markers_line(carry: MarkerCarry | None, in_place: bool) -> str:
    if in_place:
        return "revocation markers: read in place (same record bucket name)"
    if carry is None:  # only with --without-revocation-markers (see _carry)
        return ("revocation markers NOT carried over (--without-revocation-markers: they "
                "could not be read): revoke again every grant revoked after the backup was "
                "taken")  # fmt: skip
    return carry.describe()


def record_local_event(engine: Any, action: str, resource: str, reason: str) -> None:
    """Append one audit event for a local command to the deployment's own chain."""
    from storage import AuditEntry, SqlAuditLog, normalise  # noqa: PLC0415

    SqlAuditLog(engine).append([normalise(AuditEntry(
        time=datetime.now(UTC), principal=console_principal(), action=action,
        resource=resource, outcome="allowed", reason=reason[:1000],
        source=socket.gethostname(),
    ))])  # fmt: skip


def _storage_progress(bars: Bars) -> Any:
    def report(p: Any) -> None:
        bars(bpb.Progress(phase=p.phase, done=p.done, total=p.total, bytes_done=p.bytes))

    return report


def _target_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config whose [backup] names the target "
                        "(default $MEDVAULT_HOME/config.toml)")  # fmt: skip
    parser.add_argument("--target", choices=("s3", "directory"), help="override [backup] target")
    parser.add_argument("--bucket", help="override [backup] bucket")
    parser.add_argument("--directory", help="override [backup] directory")


def register(sub: Any) -> None:
    """Add ``restore-drill`` and ``restore`` to the ``medvault`` parser."""
    drill = sub.add_parser(
        "restore-drill",
        help="have the service restore a backup into scratch and verify it all",
        description="A BackupService call made with your certificate (backup_operator): "
        "the service restores the backup into a scratch bucket and database (its "
        "[backup] drill_database), verifies every record, writes a signed report into "
        "the backup target and an audit event naming you. Exit 1 on any failure.",
    )  # fmt: skip
    drill.add_argument("id", help="backup id (see `medvault backup list`)")
    drill.add_argument("--quiet", action="store_true", help="no progress output")
    drill.add_argument(
        "--sample-confidence", type=float, metavar="C",
        help="a sampled drill (archives too large to drill whole): every manifest entry and "
        "metadata row is checked, and n = ceil(ln(1-C)/ln(1-P)) random records are "
        "decrypted, e.g. 0.99 (docs/operations.md)",
    )  # fmt: skip
    drill.add_argument("--max-defect-rate", type=float, metavar="P",
                       help="the defect rate the sample rules out (default 0.01)")  # fmt: skip
    drill.add_argument("--seed", metavar="HEX",
                       help="repeat an earlier sampled drill's sample (its report's seed)")
    add_connection_flags(drill)
    drill.set_defaults(func=cmd_drill)
    real = sub.add_parser(
        "restore",
        help="restore a backup into a new, empty deployment (runs locally)",
        description="Runs locally, not through a service: the deployment --into describes "
        "has no service yet. Needs that deployment's token (PIN), database and bucket. "
        "Writes an audit event (backup.restore, principal console:<OS user>) into the "
        "restored deployment's audit trail.",
    )  # fmt: skip
    real.add_argument("id", help="backup id (see `medvault backup list`)")
    real.add_argument("--into", required=True, help="config file of the deployment to fill")
    real.add_argument("--force", action="store_true",
                      help="overwrite a target that already holds records or objects")  # fmt: skip
    real.add_argument("--trusted-key", help="PEM/DER backup public key (else the token's)")
    # Both at once would silently carry nothing (cold review 11d): argparse refuses it.
    markers = real.add_mutually_exclusive_group()
    markers.add_argument(
        "--markers-from", metavar="CONFIG",
        help="config of the deployment the backup was taken from, whose [s3] endpoint and "
        "[audit] witness_bucket hold its grant revocation markers (default --config); "
        "they are copied under the new record bucket's name",
    )  # fmt: skip
    markers.add_argument(
        "--without-revocation-markers", action="store_true",
        help="restore under another record bucket's name without the old deployment's "
        "grant revocation markers (lost with it): grants revoked after the backup are "
        "active again; revoke them again",
    )  # fmt: skip
    _target_flags(real)
    real.set_defaults(func=cmd_restore)
