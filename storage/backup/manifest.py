"""The backup manifest (format ``medvault-backup/1``), its layout keys and its signature.

A backup in a target is::

    objects/<sha256-hex>            ciphertext objects, content-addressed
    snapshots/<id>.jsonl.gz         logical snapshot of the metadata database
    manifests/<id>.json             this manifest: canonical JSON (sorted keys, no
                                    whitespace, UTF-8)
    manifests/<id>.sig.json         {"key_label", "algorithm": "ecdsa-sha256",
                                     "public_key_der": b64, "signature": b64 (DER ECDSA
                                     over the exact manifest file bytes)}

A backup is complete iff the manifest and its signature exist; they are written last,
manifest first. The manifest alone is enough to restore: it names every object (the
record's object key, its SHA-256 and size) and the snapshot's digest.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from dataclasses import asdict as _asdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keystore import Signer
from storage.backup import BackupError

FORMAT = "medvault-backup/1"
ALGORITHM = "ecdsa-sha256"
OBJECTS_PREFIX = "objects/"
SNAPSHOTS_PREFIX = "snapshots/"
MANIFESTS_PREFIX = "manifests/"
RUNS_PREFIX = "runs/"
DRILLS_PREFIX = "drills/"
_MANIFEST_SUFFIX = ".json"
_SIGNATURE_SUFFIX = ".sig.json"
_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}\Z")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}\Z")


def new_backup_id(now: datetime) -> str:
    """``<UTC yyyymmddThhmmssZ>-<8 hex>``: sorts by start time, unique across replicas."""
    return now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(4)


def check_backup_id(backup_id: str) -> str:
    """``backup_id`` if well-formed; it becomes part of keys and paths, so nothing else."""
    if not _ID.match(backup_id):
        raise BackupError("backup id must look like 20260131T020000Z-0123abcd")
    return backup_id


def object_key(sha256_hex: str) -> str:
    """Target key of the object whose ciphertext SHA-256 is ``sha256_hex``."""
    if not _SHA256_HEX.match(sha256_hex):
        raise BackupError("object digest must be 64 lowercase hex digits")
    return OBJECTS_PREFIX + sha256_hex


def snapshot_key(backup_id: str) -> str:
    """Target key of a backup's database snapshot."""
    return f"{SNAPSHOTS_PREFIX}{check_backup_id(backup_id)}.jsonl.gz"


def manifest_key(backup_id: str) -> str:
    """Target key of a backup's manifest."""
    return f"{MANIFESTS_PREFIX}{check_backup_id(backup_id)}{_MANIFEST_SUFFIX}"


def signature_key(backup_id: str) -> str:
    """Target key of a backup's manifest signature."""
    return f"{MANIFESTS_PREFIX}{check_backup_id(backup_id)}{_SIGNATURE_SUFFIX}"


def run_marker_key(backup_id: str) -> str:
    """Target key marking a run in progress (``prune`` leaves objects alone meanwhile)."""
    return f"{RUNS_PREFIX}{check_backup_id(backup_id)}.json"


def backup_id_of(key: str) -> str | None:
    """The id of a ``manifests/<id>.json`` key (not a signature); None for other keys."""
    if not key.startswith(MANIFESTS_PREFIX) or key.endswith(_SIGNATURE_SUFFIX):
        return None
    name = key[len(MANIFESTS_PREFIX) :]
    if not name.endswith(_MANIFEST_SUFFIX):
        return None
    backup_id = name[: -len(_MANIFEST_SUFFIX)]
    return backup_id if _ID.match(backup_id) else None


@dataclass(frozen=True, slots=True)
class ManifestObject:
    """One record object: the record's object key in the source, SHA-256 and size."""

    object_key: str
    sha256: str
    size: int

    @property
    def target_key(self) -> str:
        """Where the object lives in the target (content-addressed)."""
        return object_key(self.sha256)


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """The database snapshot: its key, digest, size and row count per table."""

    key: str
    sha256: str
    size: int
    tables: dict[str, int]


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """Where the backup came from; no credentials."""

    database: str
    bucket: str
    endpoint: str
    service: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """A complete backup's description (format ``medvault-backup/1``)."""

    id: str
    trigger: str
    created_at: datetime
    completed_at: datetime
    source: SourceInfo
    objects: tuple[ManifestObject, ...]
    snapshot: SnapshotInfo
    counts: dict[str, int]
    audit_head: dict[str, Any]
    copied: dict[str, int] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """The canonical file bytes (these are what the signature covers)."""
        doc = {
            "format": FORMAT,
            "id": self.id,
            "trigger": self.trigger,
            "created_at": self.created_at.astimezone(UTC).isoformat(),
            "completed_at": self.completed_at.astimezone(UTC).isoformat(),
            "source": _asdict(self.source),
            "objects": [
                _asdict(o) for o in sorted(self.objects, key=lambda o: o.object_key)
            ],
            "snapshot": _asdict(self.snapshot),
            "counts": self.counts,
            "audit_head": self.audit_head,
            "copied": self.copied,
        }
        return canonical_json(doc)

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse a manifest file; ``BackupError`` if it is not a ``medvault-backup/1``."""
        try:
            doc = json.loads(data.decode("utf-8"))
            if doc.get("format") != FORMAT:
                raise BackupError(f"unsupported manifest format {doc.get('format')!r}")
            return cls(
                id=check_backup_id(doc["id"]),
                trigger=str(doc["trigger"]),
                created_at=datetime.fromisoformat(doc["created_at"]),
                completed_at=datetime.fromisoformat(doc["completed_at"]),
                source=SourceInfo(**doc["source"]),
                objects=tuple(ManifestObject(**o) for o in doc["objects"]),
                snapshot=SnapshotInfo(**doc["snapshot"]),
                counts=dict(doc["counts"]),
                audit_head=dict(doc["audit_head"]),
                copied=dict(doc.get("copied", {})),
            )
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise BackupError(f"manifest is malformed ({type(e).__name__})") from e


def canonical_json(doc: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(manifest_bytes: bytes, signer: Signer) -> bytes:
    """The ``.sig.json`` file bytes for ``manifest_bytes`` (signed inside the token)."""
    doc = {
        "key_label": signer.key_label,
        "algorithm": ALGORITHM,
        "public_key_der": base64.b64encode(signer.public_key_der()).decode(),
        "signature": base64.b64encode(signer.sign(manifest_bytes)).decode(),
    }
    return canonical_json(doc)


def signature_problem(  # noqa: PLR0911  (one return per distinct problem)
    manifest_bytes: bytes, signature_file: bytes, trusted_public_key_der: bytes
) -> str | None:
    """None if the signature is valid under the trusted key; else what is wrong.

    The key in the signature file must equal the trusted key (the token's backup key, or
    one given for offline verification): a valid signature by any other key is a forgery.
    """
    try:
        doc = json.loads(signature_file.decode("utf-8"))
        public_der = base64.b64decode(doc["public_key_der"], validate=True)
        signature = base64.b64decode(doc["signature"], validate=True)
        algorithm = doc["algorithm"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, binascii.Error):
        return "signature file is malformed"
    if algorithm != ALGORITHM:
        return f"unsupported signature algorithm {algorithm!r}"
    if not secrets.compare_digest(public_der, trusted_public_key_der):
        return "manifest is signed by a key other than the trusted backup key"
    try:
        key = serialization.load_der_public_key(public_der)
    except ValueError:
        return "signature file holds an unreadable public key"
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return "backup key is not an EC key"
    try:
        key.verify(signature, manifest_bytes, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return "manifest signature is invalid"
    return None
