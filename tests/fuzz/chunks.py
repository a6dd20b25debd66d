"""Cutting one fuzz input into chunks, the same way on every replay."""

from __future__ import annotations

import itertools
import random
import zlib


def rng_of(data: bytes) -> random.Random:
    """A generator seeded by ``data``'s checksum: choices made from it replay exactly."""
    return random.Random(zlib.crc32(data))


def cuts(data: bytes) -> list[bytes]:
    """``data`` cut at up to 4 places chosen from its own checksum."""
    rng = rng_of(data)
    points = sorted({rng.randrange(len(data) + 1) for _ in range(rng.randrange(5))})
    return [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]
