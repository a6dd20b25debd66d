"""Tagging committed records' objects off the write path.

After a put's row commits, its object is tagged ``medvault-committed`` so that no sweep
ever deletes it (``storage.sweeper``). The tag is a whole S3 round trip: done inline it
was a quarter of a small put's time in the store (py-spy, ``bench/profile_ops.py``). The
reply does not depend on it (the record is stored once its row commits; an untagged,
referenced object is safe, and the sweep tags it), so a background thread tags objects
in commit order while the caller already has its answer.

What a crash between commit and tag leaves: a committed, untagged object. Each replica's
first sweep after start checks the tag of every referenced object, later sweeps those of
the last day (``server.BACKFILL_LOOKBACK``), and tag what they find untagged. A full
queue (an object store slower than the commits for a long time) tags inline instead:
back-pressure on writers rather than unbounded memory.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

QUEUE_LIMIT = 10_000
_STOP = object()


class CommitTagger:
    """Runs ``tag(object_key)`` on a thread of its own, in submission order."""

    def __init__(self, tag: Callable[[str], None], limit: int = QUEUE_LIMIT) -> None:
        self._tag = tag
        self._queue: queue.Queue[object] = queue.Queue(limit)
        self._thread = threading.Thread(target=self._run, name="commit-tagger", daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, object_key: str) -> None:
        """Tag ``object_key`` soon; inline when the queue is full or the tagger closed."""
        if not self._closed:
            try:
                self._queue.put_nowait(object_key)
            except queue.Full:
                pass
            else:
                return
        self._tag_logged(object_key)

    def join(self) -> None:
        """Wait until every object submitted so far is tagged (or its tag failed)."""
        self._queue.join()

    def close(self, timeout: float = 30.0) -> None:
        """Tag what is queued (up to ``timeout`` seconds), then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("commit tags still queued at shutdown; the next sweep tags them",
                        extra={"queued": self._queue.qsize()})  # fmt: skip

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                self._tag_logged(str(item))
            finally:
                self._queue.task_done()

    def _tag_logged(self, object_key: str) -> None:
        try:
            self._tag(object_key)
        except Exception as e:  # noqa: BLE001  (the record is stored; the sweep tags it)
            log.warning("object not tagged as committed; a later sweep tags it",
                        extra={"object_key": object_key, "error": type(e).__name__})  # fmt: skip
