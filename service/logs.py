"""Structured logs: one JSON object per line on stderr.

Only fields passed explicitly through ``extra`` are written, so a log line carries what
its call site chose (ids, codes, counts) and never patient data or secrets by accident.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

#: The id of the gRPC call being served, set for each call (``service.metrics``) and
#: written as ``call`` on every log line made while serving it; the client receives it
#: in the ``x-medvault-call`` trailer, so an error it reports can be found in the log.
CALL_ID: ContextVar[str | None] = ContextVar("medvault_call_id", default=None)
# The worker index of this process when a supervisor runs several (service.supervisor):
# written as ``worker`` on every log line, and the first part of every call id.
_worker: int | None = None


def set_worker(index: int) -> None:
    """Mark this process as worker ``index`` of a supervisor (log lines, call ids)."""
    global _worker  # noqa: PLW0603  (one process-wide fact, set once at start-up)
    _worker = index


def new_call_id() -> str:
    """A random call id; ``w<index>-`` first in a worker, so it names the process too."""
    call = secrets.token_hex(8)
    return call if _worker is None else f"w{_worker}-{call}"


class CallIdFilter(logging.Filter):
    """Adds the current call's id (if any) to a record as ``call``."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Always keeps the record; only annotates it."""
        call = CALL_ID.get()
        if call is not None and not hasattr(record, "call"):
            record.call = call
        if _worker is not None:
            record.worker = _worker
        return True


class JsonFormatter(logging.Formatter):
    """Formats a record as a JSON line with its ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        """The JSON line for ``record``."""
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(level: str = "INFO") -> None:
    """Send the root logger's records to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(CallIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
