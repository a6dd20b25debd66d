"""Scheduled-run ledger rows authenticated under a key the database lacks: :class:`RunSealer`.

A database writer without the token must not be able to make a slot look run, so that
a backup or a restore drill silently never happens, nor make a failed run read as a
success on the gauges (docs/security.md, "The run ledger"). Each ``backup_runs`` row
carries a MAC under a key derived once per process in the token (HMAC-SHA256 with the
index key)::

    K   = HMAC(index key, "medvault:run-ledger-key:v1" ‖ 0x00)
    mac = HMAC-SHA256(K, "backup-run-mac:v1" ‖ fields)

over slot, kind, replica, started_at, finished_at, outcome, backup_id (a leading flag
tells None from "") and detail, each length-prefixed, times in microseconds
(``storage.mac_encoding``). Slot and kind are covered, so a genuine row copied to
another slot or kind does not verify. The label keeps ``K`` apart from blind indexes (a
patient's canonical encoding starts with 0x00) and from grant keys (another label).

What a MAC cannot show: that a row was deleted, or put back to an earlier genuine state
of itself (its ``running`` claim). ``storage.backup.runs`` says what follows from each.
"""

from __future__ import annotations

from keystore import BlindIndexer
from storage.backup.run_model import ScheduledRun
from storage.derived_key import DerivedKey
from storage.mac_encoding import length_prefixed, time_field

_KEY_LABEL = b"medvault:run-ledger-key:v1\x00"
_MAC_LABEL = b"backup-run-mac:v1"


def canonical(run: ScheduledRun) -> bytes:
    """The authenticated fields of a ledger row, unambiguously encoded."""
    backup_id = b"-" if run.backup_id is None else b"+" + run.backup_id.encode()
    parts = [
        time_field(run.slot), run.kind.encode(), run.replica.encode(),
        time_field(run.started_at), time_field(run.finished_at), run.outcome.encode(),
        backup_id, run.detail.encode(),
    ]  # fmt: skip
    return _MAC_LABEL + length_prefixed(parts)


class RunSealer:
    """MACs ledger rows under a key derived in the token (once, then kept in memory)."""

    def __init__(self, indexer: BlindIndexer) -> None:
        self._derived = DerivedKey(indexer, _KEY_LABEL)

    def mac(self, run: ScheduledRun) -> bytes:
        """The MAC a genuine row of ``run`` carries."""
        return self._derived.mac(canonical(run))

    def authentic(self, run: ScheduledRun, mac: bytes | None) -> bool:
        """True when ``mac`` is the service's MAC of ``run`` (constant-time compare)."""
        return self._derived.verifies(canonical(run), mac)
