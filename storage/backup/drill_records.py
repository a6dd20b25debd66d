"""The drill's record walk: every record version of the restored store, in parallel.

For each row (read from the scratch database in batches, never all at once), a worker
thread verifies it as every read does (:class:`storage.row_auth.RowVerifier`: data key
unwrapped in the token, sealed metadata and columns), then, when the record is to be
decrypted (every record in a full drill, the sample in a sampled one): decrypts the
whole object from the restored bucket (every segment's tag), compares the plaintext
SHA-256 and size with the sealed ones and the ciphertext SHA-256 with the row and the
manifest, and validates each document signature. A record not decrypted (sampled
drill) is still checked against the manifest (its object listed there with the row's
SHA-256 and size, present in the target with that size) and its signatures unsealed.

At most ``2 x workers`` rows are in flight (:func:`storage.backup.pool.bounded_map`);
each worker streams its object (memory: about two segments per worker). Results are
gathered in row order by the calling thread, which alone reports progress.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore import BlindIndexer, KeystoreError, KeyWrapper
from storage.backup.manifest import Manifest
from storage.backup.pool import bounded_map
from storage.backup.restore import Deployment, RestoreFailure
from storage.backup.runner import BackupProgress, ProgressCallback
from storage.backup.sampling import RecordKey
from storage.envelope import StreamingAead
from storage.errors import StorageError
from storage.row_auth import RowVerifier
from storage.signatures import record_signatures, unseal_p7s
from storage.sql_metadata import from_db_time, records, to_stored_record, translated

# (p7s, content SHA-256, signing time) -> (valid, reason when not).
SignatureCheck = Callable[[bytes, bytes, datetime], tuple[bool, str]]
_BATCH = 200
Problem = tuple[str, str] | None  # (check, detail) of the first problem, None if sound


@dataclass
class Tally:
    """What the record walk verified so far."""

    records: int = 0  # record versions whose every check passed
    decrypted: int = 0  # of those, decrypted and digest-checked
    bytes: int = 0  # ciphertext bytes read and checked
    plaintext_bytes: int = 0
    signatures: int = 0  # validated
    signatures_unsealed: int = 0  # unsealed only (records not decrypted)
    failures: list[RestoreFailure] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class WalkOptions:
    """How the walk runs: threads, which records to decrypt, the target's listing."""

    workers: int = 4
    # None: decrypt every record (full drill); else only these (the sample).
    decrypt: frozenset[RecordKey] | None = None
    # Sampled drill: target key -> size of every object in the backup target.
    present: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class _Checked:
    """One row's outcome, built in a worker and counted by the caller."""

    row: Any
    problem: Problem
    decrypted: bool = False
    plaintext_bytes: int = 0
    signatures: int = 0


@dataclass(frozen=True, slots=True)
class _Row:
    row: Any
    signatures: list[Any]


def _rows(engine: Engine) -> Iterator[_Row]:
    """Every record version in key order, each with its signature rows; one query for
    the signatures of each batch of rows, so memory holds one batch."""
    query = sa.select(records).order_by(records.c.id, records.c.version)
    with translated(engine), engine.connect() as rows, engine.connect() as sigs:
        result = rows.execution_options(stream_results=True, yield_per=_BATCH).execute(query)
        for batch in result.partitions(_BATCH):
            ids = sorted({row.id for row in batch})
            found: dict[RecordKey, list[Any]] = {}
            wanted = sa.select(record_signatures).where(record_signatures.c.record_id.in_(ids))
            for sig in sigs.execute(wanted.order_by(record_signatures.c.id)):
                found.setdefault((sig.record_id, sig.version), []).append(sig)
            for row in batch:
                yield _Row(row, found.get((row.id, row.version), []))


class RecordChecks:
    """Checks one record version (thread-safe: no state but what it was built with)."""

    def __init__(
        self,
        into: Deployment,
        manifest: Manifest,
        keys: KeyWrapper,
        indexer: BlindIndexer | None,
        verify_signature: SignatureCheck,
        *,
        options: WalkOptions,
    ) -> None:
        self._blobs = into.blobs
        self._expected = {o.object_key: o for o in manifest.objects}
        self._verify_signature = verify_signature
        self._options = options
        # The same verification as every read (storage.row_auth), row columns included.
        self._verifier = RowVerifier(keys, indexer)

    def __call__(self, item: _Row) -> _Checked:
        row = item.row
        try:
            verified = self._verifier.verify(to_stored_record(row))
        except (KeystoreError, StorageError) as e:
            what = type(e).__name__
            return _Checked(row, ("key", f"data key, sealed metadata or row did not "
                                         f"authenticate ({what})"))  # fmt: skip
        decrypt = self._options.decrypt
        if decrypt is not None and (row.id, row.version) not in decrypt:
            return self._listed(item, verified.dek)
        return self._decrypted(item, verified.dek, verified.sealed.sha256, verified.ad)

    def _decrypted(self, item: _Row, dek: bytes, sealed_sha256: bytes, ad: bytes) -> _Checked:
        row = item.row
        cipher, plain, size = hashlib.sha256(), hashlib.sha256(), 0
        try:
            stream = _hashed(self._blobs.read(row.object_key), cipher)
            for chunk in StreamingAead(dek, row.segment_size).decrypt(stream, ad):
                plain.update(chunk)
                size += len(chunk)
        except StorageError as e:
            return _Checked(row, ("content", f"object did not decrypt ({type(e).__name__}: {e})"))
        if size != row.size or not secrets.compare_digest(plain.digest(), sealed_sha256):
            return _Checked(row, ("digest", "plaintext SHA-256 or size differs from the sealed "
                                            "digest"))  # fmt: skip
        if not secrets.compare_digest(cipher.digest(), bytes(row.ciphertext_sha256)):
            return _Checked(row, ("digest", "ciphertext SHA-256 differs from the row"))
        listed = self._expected.get(row.object_key)
        if listed is None or listed.sha256 != cipher.hexdigest():
            return _Checked(row, ("manifest", "object not in the manifest, or listed with "
                                              "another SHA-256"))  # fmt: skip
        problem, signatures = self._signatures_of(item, dek, sealed_sha256)
        return _Checked(row, problem, decrypted=True, plaintext_bytes=size, signatures=signatures)

    def _listed(self, item: _Row, dek: bytes) -> _Checked:
        """A record not in the sample: row against manifest and target; signatures unsealed."""
        row = item.row
        listed = self._expected.get(row.object_key)
        if (
            listed is None
            or listed.sha256 != bytes(row.ciphertext_sha256).hex()
            or (listed.size != row.stored_size)
        ):
            return _Checked(row, ("manifest", "object not in the manifest, or listed with "
                                              "another SHA-256 or size"))  # fmt: skip
        present = (self._options.present or {}).get(listed.target_key)
        if present != listed.size:
            what = "missing from" if present is None else f"{present} bytes in"
            return _Checked(row, ("object", f"{what} the backup target ({listed.target_key})"))
        for sig in item.signatures:
            try:
                unseal_p7s(dek, sig)
            except StorageError:
                return _Checked(row, ("signature", f"signature {sig.id} did not unseal "
                                                   "(altered or moved)"))  # fmt: skip
        return _Checked(row, None, signatures=len(item.signatures))

    def _signatures_of(self, item: _Row, dek: bytes, digest: bytes) -> tuple[Problem, int]:
        valid_count = 0
        for sig in item.signatures:
            try:
                # storage.signatures owns the sealing layout (place and shown columns).
                p7s = unseal_p7s(dek, sig)
            except StorageError:
                return ("signature", f"signature {sig.id} did not unseal (altered or moved)"), 0
            signing_time = from_db_time(sig.signing_time)  # SQLite keeps no zone
            valid, reason = self._verify_signature(p7s, digest, signing_time)
            if not valid:
                return ("signature", f"signature {sig.id} invalid: {reason}"), 0
            valid_count += 1
        return None, valid_count


def _hashed(chunks: Iterator[bytes], digest: hashlib._Hash) -> Iterator[bytes]:
    """Pass the ciphertext through while hashing it: one read checks tags and digest."""
    for chunk in chunks:
        digest.update(chunk)
        yield chunk


def walk_records(
    into: Deployment, checks: RecordChecks, total: int, report: ProgressCallback,
    workers: int,
) -> Tally:  # fmt: skip
    """Check every record version of ``into`` on ``workers`` threads; name each failure."""
    tally = Tally()
    report(BackupProgress("records", 0, total, 0))
    with closing(bounded_map(checks, _rows(into.engine), workers)) as results:
        for done, checked in enumerate(results, 1):
            _count(tally, checked)
            report(BackupProgress("records", done, total, tally.bytes))
    return tally


def _count(tally: Tally, checked: _Checked) -> None:
    row = checked.row
    if checked.problem is not None:
        tally.failures.append(RestoreFailure(
            checked.problem[0], checked.problem[1], row.object_key, row.id, row.version
        ))  # fmt: skip
        return
    tally.records += 1
    if checked.decrypted:
        tally.decrypted += 1
        tally.bytes += int(row.stored_size)
        tally.plaintext_bytes += checked.plaintext_bytes
        tally.signatures += checked.signatures
    else:
        tally.signatures_unsealed += checked.signatures
