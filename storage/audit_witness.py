"""Write-once witnesses of audit checkpoints, outside the database.

A database writer without the token cannot sign, but can delete signed checkpoints and
re-hash the events after them; only a copy the database cannot reach shows what was
signed. Every checkpoint is therefore also written to a witness:

* ``S3CheckpointWitness``: one object per checkpoint in a bucket created with S3 Object
  Lock, each written with a retention (COMPLIANCE by default) so that nobody, the
  bucket's owner included, can delete or shorten it before the retention ends.
  Overwriting a key only adds a newer version; the locked original stays and is read.
* ``FileCheckpointWitness``: one JSON line per checkpoint appended to a file (meant for
  an append-only file, ``chattr +a``, or one a log shipper forwards).

Key of a witness object: ``audit-checkpoints/<deployment>/<sequence, 20 digits>-<hash
hex>.json`` (the deployment is the record bucket's name, so deployments may share a
witness bucket). One listing tells verification what every witness claims; the body
(JSON, ``encode``) is read only where a claim must be trusted (it disagrees with the
database), and it is trusted only if its signature verifies under the audit key. A
witness holds sequence numbers, hashes, signatures and the public key: no patient data.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Protocol

from minio import Minio

from storage.audit_model import Checkpoint
from storage.errors import StorageError
from storage.s3_blobs import VENDOR_ERRORS

WITNESS_FORMAT: Final = "medvault.audit.witness.v1"
KEY_PREFIX: Final = "audit-checkpoints/"
# A witness object is a few hundred bytes; anything far larger is not one.
MAX_DOCUMENT: Final = 64 << 10


class WitnessError(StorageError):
    """A witness could not be written or read; the message names the witness."""


@dataclass(frozen=True, slots=True)
class WitnessClaim:
    """What a witness says was signed at ``sequence``, before its signature is checked."""

    sequence: int
    hash: bytes
    where: str  # the key or line, for messages (no data)
    witness: CheckpointWitness = field(compare=False, repr=False)


class CheckpointWitness(Protocol):
    """A write-once place that keeps a copy of every checkpoint."""

    def put(self, checkpoint: Checkpoint) -> None:
        """Keep ``checkpoint``; ``WitnessError`` if it could not be written."""
        ...

    def claims(self) -> list[WitnessClaim]:
        """Every checkpoint the witness holds, as claims, by sequence."""
        ...

    def load(self, claim: WitnessClaim) -> list[Checkpoint]:
        """The checkpoints stored for ``claim`` (each version of it): still unverified."""
        ...

    def describe(self) -> str:
        """Where the witness is, for messages (no credentials)."""
        ...


def witness_key(prefix: str, checkpoint: Checkpoint) -> str:
    """The object key of ``checkpoint`` under ``prefix``."""
    return f"{prefix}{checkpoint.sequence:020d}-{checkpoint.hash.hex()}.json"


def parse_key(key: str, prefix: str, witness: CheckpointWitness) -> WitnessClaim | None:
    """The claim a key makes; None for keys that are not witness keys."""
    name = key.removeprefix(prefix).removesuffix(".json")
    sequence, _, digest = name.partition("-")
    if len(digest) != 64:
        return None
    try:
        return WitnessClaim(int(sequence), bytes.fromhex(digest), key, witness)
    except ValueError:
        return None


def encode(checkpoint: Checkpoint) -> bytes:
    """The witness document of ``checkpoint``: one line of JSON."""
    document = {
        "format": WITNESS_FORMAT,
        "sequence": checkpoint.sequence,
        "hash": checkpoint.hash.hex(),
        "version": checkpoint.version,
        "prev_sequence": checkpoint.prev_sequence,
        "prev_digest": checkpoint.prev_digest.hex(),
        "signature": base64.b64encode(checkpoint.signature).decode(),
        "key_label": checkpoint.key_label,
        "public_key_der": base64.b64encode(checkpoint.public_key_der).decode(),
        "created_at": checkpoint.created_at.isoformat(),
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def decode(data: bytes) -> Checkpoint | None:
    """The checkpoint of a witness document; None if it is not one (garbage, not ours)."""
    try:
        d: dict[str, Any] = json.loads(data)
        if d.get("format") != WITNESS_FORMAT:
            return None
        return Checkpoint(
            sequence=int(d["sequence"]),
            hash=bytes.fromhex(d["hash"]),
            signature=base64.b64decode(d["signature"], validate=True),
            key_label=str(d["key_label"]),
            public_key_der=base64.b64decode(d["public_key_der"], validate=True),
            created_at=datetime.fromisoformat(d["created_at"]),
            version=int(d["version"]),
            prev_sequence=int(d["prev_sequence"]),
            prev_digest=bytes.fromhex(d["prev_digest"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class LockedBucket(Protocol):
    """A bucket written with Object Lock retention (``storage.backup.targets.S3Target``).

    A Protocol, not the class: the backup package verifies audit chains (its drill
    imports :mod:`storage.audit_verify`, which reads witnesses), so importing it here
    would close an import cycle.
    """

    @property
    def locking(self) -> bool:
        """Whether objects are written with a retention."""
        ...

    def ensure_bucket(self) -> None:
        """Create the bucket if absent, with Object Lock when retention is configured."""
        ...

    def put(self, key: str, chunks: Iterable[bytes]) -> int:
        """Write ``key`` atomically from ``chunks``; return the bytes written."""
        ...


class S3CheckpointWitness:
    """Checkpoints as Object Lock objects in their own bucket (see the module docstring)."""

    def __init__(
        self, client: Minio, target: LockedBucket, bucket: str, deployment: str
    ) -> None:
        if not deployment or "/" in deployment:
            raise ValueError("the deployment name must be one path segment")
        self._client = client
        self._target = target
        self._bucket = bucket
        self._prefix = f"{KEY_PREFIX}{deployment}/"

    def ensure(self, *, require_lock: bool) -> None:
        """Create the bucket (with Object Lock); refuse a bucket without it if required."""
        self._target.ensure_bucket()
        if require_lock and not self._target.locking:
            raise WitnessError(
                f"witness bucket {self._bucket} has no Object Lock: S3 cannot add it to an "
                "existing bucket; name a new bucket (it is created with Object Lock)"
            )

    def put(self, checkpoint: Checkpoint) -> None:
        """Write the checkpoint's object, with the retention when the bucket locks."""
        try:
            self._target.put(witness_key(self._prefix, checkpoint), [encode(checkpoint)])
        except (StorageError, *VENDOR_ERRORS) as e:
            raise WitnessError(f"could not write to witness {self.describe()}") from e

    def claims(self) -> list[WitnessClaim]:
        """One listing of the witness keys, versions included.

        Versions, because a plain DELETE on a locked bucket adds a delete marker that
        hides the key from an ordinary listing while the locked version stays.
        """
        try:
            keys = {o.object_name for o in self._client.list_objects(
                self._bucket, prefix=self._prefix, recursive=True, include_version=True
            )}  # fmt: skip
        except VENDOR_ERRORS as e:
            raise WitnessError(f"could not list witness {self.describe()}") from e
        found = (parse_key(k, self._prefix, self) for k in keys if k is not None)
        return sorted((c for c in found if c is not None), key=lambda c: c.sequence)

    def load(self, claim: WitnessClaim) -> list[Checkpoint]:
        """Every version of the claim's object (an overwrite cannot hide the locked one)."""
        try:
            versions = [o.version_id for o in self._client.list_objects(
                self._bucket, prefix=claim.where, include_version=True
            ) if o.object_name == claim.where and not o.is_delete_marker]  # fmt: skip
            return [c for v in versions if (c := decode(self._get(claim.where, v))) is not None]
        except VENDOR_ERRORS as e:
            raise WitnessError(f"could not read witness {self.describe()}") from e

    def _get(self, key: str, version: str | None) -> bytes:
        response = self._client.get_object(self._bucket, key, version_id=version)
        try:
            return bytes(response.read(MAX_DOCUMENT))
        finally:
            response.close()
            response.release_conn()

    def key(self, checkpoint: Checkpoint) -> str:
        """The object key that holds ``checkpoint``."""
        return witness_key(self._prefix, checkpoint)

    def describe(self) -> str:
        """``s3://bucket/prefix``."""
        return f"s3://{self._bucket}/{self._prefix}"


class FileCheckpointWitness:
    """Checkpoints as JSON lines appended to one file (fsynced after each)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)

    def put(self, checkpoint: Checkpoint) -> None:
        """Append one line; O_APPEND, so an append-only (``chattr +a``) file works."""
        try:
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, encode(checkpoint))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise WitnessError(f"could not append to witness file {self._path}") from e

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        try:
            data = self._path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            raise WitnessError(f"could not read witness file {self._path}") from e
        yield from enumerate(io.BytesIO(data), start=1)

    def claims(self) -> list[WitnessClaim]:
        """One claim per line; a line that is not a witness document claims its line number."""
        found: list[WitnessClaim] = []
        for number, line in self._lines():
            checkpoint = decode(line)
            if checkpoint is not None:
                claim = WitnessClaim(checkpoint.sequence, checkpoint.hash, f"line {number}", self)
                found.append(claim)
        return sorted(found, key=lambda c: c.sequence)

    def load(self, claim: WitnessClaim) -> list[Checkpoint]:
        """The checkpoint on the claim's line."""
        wanted = int(claim.where.removeprefix("line "))
        for number, line in self._lines():
            if number == wanted:
                checkpoint = decode(line)
                return [checkpoint] if checkpoint is not None else []
        return []

    def describe(self) -> str:
        """The file's path."""
        return str(self._path)


@dataclass
class WitnessedSet:
    """Every witness's claims by sequence, and the check that makes one trustworthy."""

    claims: dict[int, list[WitnessClaim]]
    verify_signature: Callable[[Checkpoint], bool]
    names: list[str]

    def at(self, sequence: int) -> list[WitnessClaim]:
        """The claims at ``sequence`` (usually one per witness)."""
        return self.claims.get(sequence, [])

    def beyond(self, sequence: int) -> list[WitnessClaim]:
        """The claims past ``sequence``, oldest first."""
        return [c for s in sorted(self.claims) if s > sequence for c in self.claims[s]]

    def genuine(self, claim: WitnessClaim) -> bool:
        """Whether some stored version of ``claim`` is a checkpoint the audit key signed."""
        return any(
            c.sequence == claim.sequence and c.hash == claim.hash and self.verify_signature(c)
            for c in claim.witness.load(claim)
        )

    def latest_genuine(self) -> Checkpoint | None:
        """The highest-sequence checkpoint a witness holds that the audit key signed."""
        for sequence in sorted(self.claims, reverse=True):
            for claim in self.claims[sequence]:
                for c in claim.witness.load(claim):
                    if (c.sequence, c.hash) == (sequence, claim.hash) and self.verify_signature(c):
                        return c
        return None

    def describe(self) -> str:
        """How many claims from which witnesses, for the verification report."""
        count = sum(len(c) for c in self.claims.values())
        return f"compared with {count} witnessed checkpoints ({', '.join(self.names)})"


def gather(
    witnesses: Sequence[CheckpointWitness], verify_signature: Callable[[Checkpoint], bool]
) -> WitnessedSet:
    """Read every witness's claims (one listing each); ``WitnessError`` if one cannot."""
    claims: dict[int, list[WitnessClaim]] = {}
    for witness in witnesses:
        for claim in witness.claims():
            claims.setdefault(claim.sequence, []).append(claim)
    return WitnessedSet(claims, verify_signature, [w.describe() for w in witnesses])
