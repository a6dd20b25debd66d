"""Grant rows authenticated, and their free text sealed, under keys the database lacks.

A database writer without the token must not be able to give themselves a grant, nor
read a break-the-glass reason or review comment (free text that may name a patient).

Each grant has its own key, derived in the token from the index key (HMAC-SHA256)::

    K = HMAC(index key, "medvault:grant-key:v1" ‖ 0x00 ‖ grant id)

The label keeps these inputs apart from blind-index inputs: a patient's canonical
encoding starts with a 4-byte big-endian length whose first byte is 0x00 for any real
authority, while the label starts with "m" (0x6d). From ``K``, in software:

* ``mac = HMAC-SHA256(K, "grant-mac" ‖ fields)`` over id, patient index, principal,
  granted_by, created_at, expires_at, break_glass and the SHA-256 of the sealed reason
  (each length-prefixed; times as integer microseconds since the epoch, -1 for none).
* the reason: ``storage.sealing.seal_bytes(K, "medvault:grant-reason:v1", aad=id)``.
* the review comment: ``seal_bytes(K, "medvault:grant-review:v1", aad=id ‖ reviewer ‖
  reviewed_at)``: only a comment sealed by the service for this reviewer and time opens,
  so marking a grant reviewed in the database alone does not make it reviewed.

Revocation is not covered by the MAC: revoking only takes access away, and needs no
token. Putting a row back to an earlier authentic state (un-revoking) is not detectable
from the row; each revocation therefore first writes a marker outside the database
(``storage.grant_revocations``), and a grant a marker names grants nothing whatever its
row says (docs/security.md, "Revocations outside the database").

Derived keys are cached per grant id (bounded), so the read path's grant check costs
one token operation per grant per process, then only a software HMAC.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections import OrderedDict
from datetime import datetime

from keystore import BlindIndexer
from storage.grants_model import Grant
from storage.mac_encoding import length_prefixed, time_field
from storage.sealing import seal_bytes, unseal_bytes

_KEY_LABEL = b"medvault:grant-key:v1\x00"
_MAC_LABEL = b"grant-mac"
_REASON_INFO = b"medvault:grant-reason:v1"
_REVIEW_INFO = b"medvault:grant-review:v1"
MAC_LENGTH = 32


def canonical(grant: Grant, sealed_reason: bytes | None) -> bytes:
    """The authenticated fields of a grant row, unambiguously encoded."""
    parts = [
        grant.id.encode(),
        grant.patient_index,
        grant.principal.encode(),
        grant.granted_by.encode(),
        time_field(grant.created_at),
        time_field(grant.expires_at),
        b"1" if grant.break_glass else b"0",
        hashlib.sha256(sealed_reason).digest() if sealed_reason else b"",
    ]
    return _MAC_LABEL + length_prefixed(parts)


def _review_aad(grant_id: str, reviewer: str, reviewed_at: datetime) -> bytes:
    return length_prefixed((grant_id.encode(), reviewer.encode(), time_field(reviewed_at)))


class GrantSealer:
    """MACs grant rows and seals their free text under per-grant keys from the token."""

    def __init__(self, indexer: BlindIndexer, cache_size: int = 4096) -> None:
        self._indexer = indexer
        self._cache_size = cache_size
        self._keys: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def _key(self, grant_id: str) -> bytes:
        with self._lock:
            key = self._keys.get(grant_id)
            if key is not None:
                self._keys.move_to_end(grant_id)
                return key
        key = self._indexer.blind_index(_KEY_LABEL + grant_id.encode())
        with self._lock:
            self._keys[grant_id] = key
            while len(self._keys) > self._cache_size:
                self._keys.popitem(last=False)
        return key

    def mac(self, grant: Grant, sealed_reason: bytes | None) -> bytes:
        """The MAC a genuine row of ``grant`` carries."""
        return hmac.new(self._key(grant.id), canonical(grant, sealed_reason), "sha256").digest()

    def authentic(self, grant: Grant, sealed_reason: bytes | None, mac: bytes | None) -> bool:
        """True when ``mac`` is the service's MAC of the row (constant-time compare)."""
        if mac is None or len(mac) != MAC_LENGTH:
            return False
        return hmac.compare_digest(self.mac(grant, sealed_reason), mac)

    def seal_reason(self, grant_id: str, reason: str) -> bytes:
        """The break-the-glass reason as ciphertext bound to its grant."""
        return seal_bytes(self._key(grant_id), _REASON_INFO, grant_id.encode(), reason.encode())

    def open_reason(self, grant_id: str, blob: bytes) -> str:
        """The reason; ``IntegrityError`` if the blob was altered or moved."""
        key = self._key(grant_id)
        data = unseal_bytes(key, _REASON_INFO, grant_id.encode(), blob, what="grant reason")
        return data.decode()

    def seal_review(self, grant_id: str, reviewer: str, reviewed_at: datetime, text: str) -> bytes:
        """The review comment as ciphertext bound to its grant, reviewer and time."""
        aad = _review_aad(grant_id, reviewer, reviewed_at)
        return seal_bytes(self._key(grant_id), _REVIEW_INFO, aad, text.encode())

    def open_review(self, grant_id: str, reviewer: str, reviewed_at: datetime, blob: bytes) -> str:
        """The comment; ``IntegrityError`` if the review was not made by the service."""
        aad = _review_aad(grant_id, reviewer, reviewed_at)
        key = self._key(grant_id)
        return unseal_bytes(key, _REVIEW_INFO, aad, blob, what="grant review").decode()
