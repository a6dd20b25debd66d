"""One-time delegation tokens: a bounded cache of the ``jti`` values already presented.

With ``[delegation] replay_cache = true`` every token must carry a ``jti``, and a
``jti`` seen before is refused until the token it came with has expired (``exp`` plus
the policy's leeway, after which the signature check refuses the token anyway). Memory
is bounded: entries leave as their tokens expire, and when ``replay_cache_size`` live
entries are held a new token is refused rather than an old entry forgotten (forgetting
would reopen the replay window silently).

The cache is per process: a token replayed to another process or replica is not caught
here. Short token lifetimes bound that window; docs/security.md says so.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from service.errors import ServiceError

_MAX_JTI_LENGTH = 256


class ReplayError(ServiceError):
    """The token is not acceptable as a one-time token; the message never echoes it."""


class ReplayCache:
    """``jti`` -> expiry of the tokens presented, forgotten once they expire."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []  # (forget at, jti), soonest first

    def __len__(self) -> int:
        return len(self._expiry)

    def admit(self, claims: Mapping[str, Any], capacity: int, leeway: float = 0) -> None:
        """Record the token's ``jti``; ``ReplayError`` if it was seen or cannot be held."""
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > _MAX_JTI_LENGTH:
            raise ReplayError("token missing claim jti (one-time tokens are required)")
        exp = claims.get("exp")
        if not isinstance(exp, int | float):
            raise ReplayError("token missing claim exp")
        forget_at = float(exp) + leeway
        with self._lock:
            now = self._clock()
            self._forget_expired(now)
            if jti in self._expiry:
                raise ReplayError("token replayed (its jti was presented before)")
            if len(self._expiry) >= capacity:
                raise ReplayError("token replay cache is full; try again shortly")
            self._expiry[jti] = forget_at
            heapq.heappush(self._heap, (forget_at, jti))

    def _forget_expired(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            _, jti = heapq.heappop(self._heap)
            self._expiry.pop(jti, None)
