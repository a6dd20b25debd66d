"""A MAC key derived in the token once per process, then kept in memory: :class:`DerivedKey`.

``K = HMAC(index key, label)`` through the blind indexer (``keystore.BlindIndexer``):
the database never holds it, so a database writer cannot MAC a row. Each ledger has
its own label, ending in 0x00 so that no blind-index input (a patient's canonical
encoding starts with 0x00) and no other label gives the same input. Used by the
scheduled-run ledger (``storage.backup.run_seal``) and the scheduled-work ledger
(``storage.work_seal``), which MAC and verify their rows through it
(HMAC-SHA256 under ``K``, compared in constant time).
"""

from __future__ import annotations

import hmac
import threading

from keystore import BlindIndexer

MAC_LENGTH = 32


class DerivedKey:
    """``HMAC(index key, label)``, asked of the token on first use only."""

    def __init__(self, indexer: BlindIndexer, label: bytes) -> None:
        self._indexer = indexer
        self._label = label
        self._key: bytes | None = None
        self._lock = threading.Lock()

    def __call__(self) -> bytes:
        """The key (one token operation the first time, then none)."""
        with self._lock:
            if self._key is None:
                self._key = self._indexer.blind_index(self._label)
            return self._key

    def mac(self, message: bytes) -> bytes:
        """HMAC-SHA256 of ``message`` under the key."""
        return hmac.new(self(), message, "sha256").digest()

    def verifies(self, message: bytes, mac: bytes | None) -> bool:
        """True when ``mac`` is the MAC of ``message`` (constant-time compare)."""
        if mac is None or len(mac) != MAC_LENGTH:
            return False
        return hmac.compare_digest(self.mac(message), mac)
