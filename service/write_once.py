"""The write-once places outside the database that the service keeps: copies of the
audit trail's checkpoints (``storage.audit_witness``) and grant revocation markers
(``storage.grant_revocations``). A database writer without the token can put rows back to
an earlier state; these say what the database must not be allowed to forget. Wired by
``service.bootstrap``, and by ``medvault restore`` (``MarkerCarry``: the markers are
keyed by the record bucket's name, so a restore under another name copies them over).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from minio import Minio

from service.config import Config, ConfigError
from storage import (
    CheckpointWitness,
    FileCheckpointWitness,
    GrantSealer,
    Marker,
    RevocationMarkerError,
    RevokedGrants,
    S3CheckpointWitness,
    S3RevocationMarkers,
    S3Target,
    StorageError,
    WitnessError,
    authentic_grant_row,
    copy_markers,
    revoked_row_markers,
)


def audit_witnesses(config: Config, client: Minio) -> list[CheckpointWitness]:
    """The write-once places of ``[audit]`` that keep a copy of every checkpoint.

    The bucket is created with Object Lock when absent; an existing bucket without it
    is refused at start-up unless ``witness_lock_days = 0`` says to do without.
    """
    audit = config.audit
    witnesses: list[CheckpointWitness] = []
    if audit.witness_bucket:
        target = S3Target(
            client, audit.witness_bucket,
            lock_days=audit.witness_lock_days, lock_mode=audit.witness_lock_mode,
        )  # fmt: skip
        witness = S3CheckpointWitness(client, target, audit.witness_bucket, config.s3.bucket)
        try:
            witness.ensure(require_lock=audit.witness_lock_days > 0)
        except (WitnessError, StorageError) as e:
            raise ConfigError(f"[audit] witness_bucket: {e}") from e
        witnesses.append(witness)
    if audit.witness_file:
        witnesses.append(FileCheckpointWitness(audit.witness_file))
    return witnesses


def marker_store(config: Config, client: Minio, record_bucket: str = "") -> S3RevocationMarkers:
    """The grant revocation markers of ``config``'s deployment: in its witness bucket
    (Object Lock), else in its record bucket (no lock); under its record bucket's name, or
    under ``record_bucket`` (the name a backup was taken under, for a restore)."""
    audit = config.audit
    name = record_bucket or config.s3.bucket
    bucket = audit.witness_bucket or name
    lock_days = audit.witness_lock_days if audit.witness_bucket else 0
    target = S3Target(client, bucket, lock_days=lock_days, lock_mode=audit.witness_lock_mode)
    return S3RevocationMarkers(client, target, bucket, name)


def revoked_grants(config: Config, client: Minio) -> RevokedGrants:
    """The grant revocation markers (``storage.grant_revocations``), loaded and refreshed:
    in the witness bucket (Object Lock), else in the record bucket (no lock)."""
    audit = config.audit
    revoked = RevokedGrants(
        marker_store(config, client),
        audit.revocation_refresh_seconds,
        audit.revocation_stale_seconds,
    )
    try:
        revoked.start()
    except StorageError as e:
        raise ConfigError(f"[audit] grant revocation markers: {e}") from e
    return revoked


_LOST = (
    "if the old deployment's markers are lost, pass --without-revocation-markers and "
    "revoke again every grant revoked after the backup was taken (it is active in the "
    "restored database)"
)


class MarkerCarry:
    """A restore's copy of the backed-up deployment's revocation markers under the
    restored deployment's record bucket name (docs/operations.md, restoring).

    ``check`` lists the old markers and ``check_revoked`` holds the backup's revoked
    grants against them, before anything is restored (a restore that could not carry
    them, or that looks for them in the wrong place, is refused having written
    nothing); ``copy`` writes the missing ones after the objects, before any row is
    loaded, so the restored deployment holds no grant row whose revocation its service
    would not know.
    """

    def __init__(
        self, source: S3RevocationMarkers, destination: S3RevocationMarkers, origin: str = ""
    ) -> None:
        self.source = source
        self.destination = destination
        self.origin = origin  # the option and config file the source comes from
        self.found = self.written = self.left = self.remarked = 0
        self.unmarked: list[Marker] = []
        self.marked: frozenset[str] = frozenset()  # grant ids the old markers name (check)

    def check(self) -> int:
        """List the old markers (how many), keeping their grant ids (``marked``, for the
        restore to give ``check_revoked`` those grants' rows); ``RevocationMarkerError``
        naming what to do if they cannot be read."""
        listed = self._listed()
        self.marked = frozenset(m.grant_id for m in listed)
        return len(listed)

    def _listed(self) -> list[Marker]:
        try:
            return self.source.list(None)
        except RevocationMarkerError as e:
            raise RevocationMarkerError(
                f"the grant revocation markers of the deployment backed up "
                f"({self._where()}) could not be read; nothing was restored. Name "
                "the config of that deployment with --markers-from (its [s3] and [audit] "
                f"witness_bucket say where they are); {_LOST}"
            ) from e

    def check_revoked(self, rows: Sequence[Mapping[str, Any]], sealer: GrantSealer) -> None:
        """Hold the backup's revoked grant rows against the old markers, before anything
        is written.

        Each revocation wrote its marker before its row committed, and every start marks
        the authentic revoked rows that lack one (``mark_revoked_rows``), so the old
        deployment's markers name its revoked grants. When the backup holds authentic
        revoked grants and the source names **no** grant of the backup at all, the source
        is not where that deployment kept its markers (a wrong ``--markers-from`` or
        default config, or the markers are lost): carrying "0 markers" would lose every
        revocation made after the backup, which only the markers know. Refused, naming
        the source.

        When it names **some** grant of the backup (``rows`` holds the backup's revoked
        rows and its rows of the grants ``check`` listed markers of), revoked there or
        later, it is that deployment's place: grant ids are 128 random bits, and only a
        row the token MAC'd counts, since a database writer chooses a forged row's id
        (it could name a marker of the wrong place, to slip a wrong source through). A
        marker only of a grant revoked after the backup counts too: else a backup whose
        revoked grants all lack markers could not be restored at all while such a marker
        is there (``--without-revocation-markers`` is refused then). Each revoked grant
        missing there (a revocation by a release before the markers, on a replica that
        never started again; or a marker deleted after its retention) is recoverable:
        the backup's own row says the grant was revoked, and when. Its marker is written
        from the row (``copy``), as the restored service's start would, but before any
        row loads, so nobody can clear the row's ``revoked_at`` in between. Refusing
        instead would leave no way to restore (the old markers can be read, so
        ``--without-revocation-markers`` is refused too) and recover nothing more; the
        count is reported and audited for the security officer. Rows whose MAC the token
        did not make are passed over (they grant nothing; a database writer's rows must
        neither block a restore nor become locked objects).
        """
        marked = {m.grant_id for m in self._listed()}
        unmarked = revoked_row_markers(
            (row for row in rows if row["id"] not in marked), sealer, datetime.now(UTC)
        )
        if unmarked and not any(
            authentic_grant_row(row, sealer) for row in rows if row["id"] in marked
        ):
            raise RevocationMarkerError(
                f"the backup holds {len(unmarked)} revoked grant(s) and no revocation marker "
                f"at {self._where()} names any grant of it: that is not where the deployment "
                "backed up kept its markers, and every grant it revoked after the backup "
                "would be active again; nothing was restored. Check that --markers-from "
                "(default --config) names the config of the deployment the backup was "
                "taken from (its [s3] endpoint and [audit] witness_bucket, where its "
                f"markers are); {_LOST}"
            )
        self.unmarked = unmarked

    def _where(self) -> str:
        origin = f", from {self.origin}" if self.origin else ""
        return f"{self.source.describe()}{origin}"

    def copy(self, grant_ids: frozenset[str]) -> None:
        """Write every old marker of a grant of ``grant_ids`` (the snapshot's) the new
        name lacks (same grant id and time), the others left behind; then the marker of
        each revoked grant ``check_revoked`` found none of, from its row."""
        try:
            self.found, self.written, self.left = copy_markers(
                self.source, self.destination, grant_ids
            )
            present = {m.grant_id for m in self.destination.list(None)}
            for marker in self.unmarked:
                if marker.grant_id not in present:  # a run again with --force skips it
                    self.destination.put(marker.grant_id, marker.revoked_at)
                    self.remarked += 1
        except RevocationMarkerError as e:
            raise RevocationMarkerError(
                f"the grant revocation markers of {self.source.describe()} could not be "
                f"copied to {self.destination.describe()}: the objects are restored, no "
                "database row is; do not start the service on it. Fix the cause and run "
                f"the restore again with --force; {_LOST}"
            ) from e

    def describe(self) -> str:
        """What was carried, for the operator and the restore's audit event."""
        carried = (
            f"{self.found} revocation marker(s) of {self.source.describe()} carried over "
            f"to {self.destination.describe()} ({self.written} written; {self.left} "
            "naming no grant of the backup left behind)"
        )
        if not self.unmarked:
            return carried
        return (
            f"{carried}; {len(self.unmarked)} revoked grant(s) of the backup had no marker "
            f"there: written from the backup's rows ({self.remarked} written). A marker "
            "missing there was never written (a release before the markers) or was deleted: "
            "check that bucket"
        )


def marker_carry(
    source: Config,
    source_client: Minio,
    into: Config,
    into_client: Minio,
    backed_up: str,
    *,
    origin: str = "",
) -> MarkerCarry | None:
    """The carry of a restore of a backup taken under record bucket ``backed_up``, from
    the deployment ``source`` describes (its S3 endpoint and witness bucket) into
    ``into``; None when the restored deployment reads its markers where they are (same
    endpoint, bucket and name). The destination's witness bucket is ensured (with Object
    Lock) as the service does at start. ``origin`` names where ``source`` was read
    from (an option and its config file), for the errors."""
    try:
        old = marker_store(source, source_client, backed_up)
    except ValueError as e:  # a manifest naming no bucket (one path segment)
        raise RevocationMarkerError(
            f"the backup names no usable record bucket ({e}); {_LOST}"
        ) from e
    new = marker_store(into, into_client)
    if (source.s3.endpoint, old.describe()) == (into.s3.endpoint, new.describe()):
        return None
    audit_witnesses(into, into_client)
    return MarkerCarry(old, new, origin)
