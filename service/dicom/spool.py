"""Where a C-STORE's data set goes while it arrives: a temporary file of bounded size.

pynetdicom (with ``STORE_RECV_CHUNKED_DATASET``) writes each received data set to a
``NamedTemporaryFile`` as its fragments arrive, so nothing is held in memory; but it
writes all of it, whatever its size. ``install(cap)`` replaces the file pynetdicom makes
with one that stops writing after ``cap`` bytes and remembers that it did: the rest of
an oversized data set is read off the network and dropped, and the C-STORE handler
refuses the instance (``oversized``) without storing anything. Disk use per association
is at most ``cap`` plus the file meta.
"""

from __future__ import annotations

import tempfile
import threading
from typing import Any

import pynetdicom.dimse_messages

_LOCK = threading.Lock()
_OVERSIZED: set[str] = set()


class BoundedSpool:
    """A write-only temporary file that keeps the first ``cap`` bytes written to it."""

    def __init__(self, cap: int, **kwargs: Any) -> None:
        self._file = tempfile.NamedTemporaryFile(**kwargs)  # noqa: SIM115  (closed by pynetdicom)
        self.name: str = self._file.name
        self.file = self._file.file  # pynetdicom flushes through it
        self._cap = cap
        self._written = 0
        self._over = False

    def write(self, data: bytes) -> int:
        """Write ``data`` while under the cap; afterwards drop it (and note the overflow)."""
        if not self._over and self._written + len(data) > self._cap:
            self._over = True
            self._file.truncate(0)  # the part kept is useless: give the disk back now
            with _LOCK:
                _OVERSIZED.add(self.name)
        if self._over:
            return len(data)
        self._written += len(data)
        return int(self._file.write(data))

    def close(self) -> None:
        """Close the file (pynetdicom deletes it after the handler ran)."""
        self._file.close()


def oversized(path: str) -> bool:
    """True (once) if the data set spooled at ``path`` went over the cap."""
    with _LOCK:
        if path in _OVERSIZED:
            _OVERSIZED.discard(path)
            return True
    return False


def install(cap: int) -> None:
    """Make pynetdicom spool received data sets into ``BoundedSpool`` files of ``cap``."""

    def spool(**kwargs: Any) -> BoundedSpool:
        return BoundedSpool(cap, **kwargs)

    pynetdicom.dimse_messages.NamedTemporaryFile = spool  # type: ignore[attr-defined,assignment]
