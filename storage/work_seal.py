"""Scheduled-work ledger rows authenticated under a key the database lacks: :class:`WorkSealer`.

A database writer without the token must not be able to make periodic work look done:
dating the orphan sweep's ``scheduled_work`` row to now before each round made every
replica skip every sweep, silently for ever (orphans kept, expired put request ids never
pruned; cold review 11c). Each row carries a MAC (column ``mac``, migration ``0016``)
under a key derived once per process in the token (``storage.derived_key``)::

    K   = HMAC(index key, "medvault:work-ledger-key:v1" ‖ 0x00)
    mac = HMAC-SHA256(K, "scheduled-work-mac:v1" ‖ name ‖ last_run_at ‖ replica)

each field length-prefixed, the time in microseconds (``storage.mac_encoding``). The
name is covered, so a genuine row copied to another name (the ``sweep`` row to
``sweep:done``, another work's fresh row to ``sweep``) does not verify; the time is, so
a genuine row cannot be dated anew. Its own label keeps ``K`` apart from the run
ledger's and the grants' keys.

What a MAC cannot show: that a row was deleted, or put back to an earlier genuine state
of itself (an older time, which only makes a round due). ``storage.work_ledger`` says
what follows from each.
"""

from __future__ import annotations

from datetime import datetime

from keystore import BlindIndexer
from storage.derived_key import DerivedKey
from storage.mac_encoding import length_prefixed, time_field

_KEY_LABEL = b"medvault:work-ledger-key:v1\x00"
_MAC_LABEL = b"scheduled-work-mac:v1"


def canonical(name: str, last_run_at: datetime, replica: str) -> bytes:
    """The authenticated fields of a ``scheduled_work`` row, unambiguously encoded."""
    return _MAC_LABEL + length_prefixed([name.encode(), time_field(last_run_at), replica.encode()])


class WorkSealer:
    """MACs ``scheduled_work`` rows under a key derived in the token."""

    def __init__(self, indexer: BlindIndexer) -> None:
        self._derived = DerivedKey(indexer, _KEY_LABEL)

    def mac(self, name: str, last_run_at: datetime, replica: str) -> bytes:
        """The MAC a genuine row of ``name`` run at ``last_run_at`` by ``replica`` carries."""
        return self._derived.mac(canonical(name, last_run_at, replica))

    def authentic(self, name: str, last_run_at: datetime, replica: str, mac: bytes | None) -> bool:
        """True when ``mac`` is the service's MAC of the row (constant-time compare)."""
        return self._derived.verifies(canonical(name, last_run_at, replica), mac)
