"""The sampled restore drill's statistics: how many records, and which ones.

**How many.** If a fraction ``p`` (or more) of an archive's records were unreadable, a
uniformly random sample of ``n`` records would miss every one of them with probability
at most ``(1 - p)^n`` (sampling with replacement; sampling without replacement, as here,
misses them even less often). Asking that this be at most ``1 - c`` gives

    n = ceil(ln(1 - c) / ln(1 - p))

e.g. c = 0.99, p = 0.01: n = 459; c = 0.999, p = 0.001: n = 6905. ``n`` does not grow
with the archive (that is the point: a 1 TB archive needs the same 459 records as a
1 GB one), and when ``n`` reaches the number of records every record is decrypted.
A sampled drill that passes therefore says "with confidence c, fewer than p of the
records are unreadable"; it says nothing about any one record not in the sample.

**Which ones.** Each record version gets the rank ``SHA-256(seed || record id || ":" ||
version)``; the sample is the ``n`` versions of lowest rank. With a random seed (128
bits, recorded in the report) that is a simple random sample without replacement, it
needs memory for ``n`` keys only (whatever the archive's size), and anybody holding the
seed and the backup can recompute it, in any order of rows, with a few lines of code.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from storage.errors import InvalidRecordError

SEED_BYTES = 16
_MAX_SEED_BYTES = 32
# Below this the drill would decrypt more records than exist in any archive anyway, and
# the floating-point logarithms lose their meaning.
_MIN_RATE = 1e-6


def sample_size(confidence: float, max_defect_rate: float) -> int:
    """The smallest ``n`` with ``(1 - max_defect_rate)^n <= 1 - confidence``."""
    check_plan(confidence, max_defect_rate)
    n = max(1, math.ceil(math.log1p(-confidence) / math.log1p(-max_defect_rate) - 1e-9))
    while (1 - max_defect_rate) ** n > 1 - confidence:  # rounding of the logarithms
        n += 1
    return n


def check_plan(confidence: float, max_defect_rate: float) -> None:
    """``InvalidRecordError`` naming the field unless both are in range."""
    if not 0.5 <= confidence < 1:  # NaN fails too
        raise InvalidRecordError(
            "sample_confidence", "must be at least 0.5 and below 1 (e.g. 0.99)"
        )
    if not _MIN_RATE <= max_defect_rate < 1:
        raise InvalidRecordError(
            "max_defect_rate", f"must be at least {_MIN_RATE:g} and below 1 (e.g. 0.01)"
        )


def parse_seed(text: str) -> bytes:
    """A seed given as hex (1 to 32 bytes); empty = a new random 128-bit seed."""
    if not text:
        return secrets.token_bytes(SEED_BYTES)
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        seed = b""
    if not 1 <= len(seed) <= _MAX_SEED_BYTES:
        raise InvalidRecordError("seed", f"must be 2 to {2 * _MAX_SEED_BYTES} hex digits")
    return seed


@dataclass(frozen=True, slots=True)
class SamplePlan:
    """A sampled drill: the confidence asked for, the defect rate ruled out, the seed."""

    confidence: float
    max_defect_rate: float
    seed: bytes

    @property
    def size(self) -> int:
        """Records to decrypt (before capping at the archive's record count)."""
        return sample_size(self.confidence, self.max_defect_rate)


RecordKey = tuple[str, int]  # (record id, version)
# A record key, or one with the record's object key after it: read strictly by the
# caller (``storage.row_values``), never converted here (``int()`` of another type
# raised with the value in its message).
Row = TypeVar("Row", bound=tuple[str, int] | tuple[str, int, str])


def rank(seed: bytes, key: RecordKey) -> bytes:
    """The record version's place in the seed's random order (lowest first)."""
    return hashlib.sha256(seed + f"{key[0]}:{key[1]}".encode()).digest()


def choose(seed: bytes, rows: Iterable[Row], n: int) -> list[Row]:
    """The ``n`` rows (id, version, ...) of lowest rank, in key order (memory: ``n`` rows)."""
    chosen = heapq.nsmallest(n, rows, key=lambda r: rank(seed, (r[0], r[1])))
    return sorted(chosen, key=lambda r: (r[0], r[1]))


def selection_digest(chosen: list[RecordKey]) -> str:
    """SHA-256 (hex) of the chosen keys, one ``id:version`` line each in key order: an
    auditor who recomputes the sample compares this instead of a list of ids."""
    return hashlib.sha256("".join(f"{i}:{v}\n" for i, v in chosen).encode()).hexdigest()
