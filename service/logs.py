"""Structured logs: one JSON object per line on stderr.

Only fields passed explicitly through ``extra`` are written, so a log line carries what
its call site chose (ids, codes, counts) and never patient data or secrets by accident.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

#: The id of the gRPC call being served, set for each call (``service.metrics``) and
#: written as ``call`` on every log line made while serving it; the client receives it
#: in the ``x-medvault-call`` trailer, so an error it reports can be found in the log.
CALL_ID: ContextVar[str | None] = ContextVar("medvault_call_id", default=None)


class CallIdFilter(logging.Filter):
    """Adds the current call's id (if any) to a record as ``call``."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Always keeps the record; only annotates it."""
        call = CALL_ID.get()
        if call is not None and not hasattr(record, "call"):
            record.call = call
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
