"""What an officer's listing of the trail shows: the events it can read.

A row the writer never stores (``storage.audit_rows``: a value of another type, a short
hash, an unknown outcome) was written by someone with access to the database. It is
left out of QueryEvents and ExportEvents, since nothing in it can be trusted to show,
and reported rather than silently dropped: a log line naming its sequence and fields
(never a value) and a ``audit-tampered`` incident, once per row and denial window, so
the officer learns of it from the trail itself. ``medvault audit verify`` names it as
"event altered".
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from service.incidents import IncidentDetector
from storage import ChainedEvent

logger = logging.getLogger(__name__)
INCIDENT = "audit-tampered"
DESCRIPTION = (
    "an audit event row holds values the audit writer never stores (changed in the "
    "database); it was left out of a listing: run `medvault audit verify`"
)


def readable(events: Iterable[ChainedEvent], incidents: IncidentDetector) -> Iterator[ChainedEvent]:
    """``events`` without the malformed ones, each of those logged and reported."""
    for event in events:
        if not event.malformed:
            yield event
            continue
        sequence = None if "sequence" in event.malformed else event.sequence
        logger.warning(
            "audit event unreadable, left out of the listing; run `medvault audit verify`",
            extra={"sequence": sequence, "fields": ",".join(event.malformed)},
        )
        resource = f"audit/{sequence if sequence is not None else 'unreadable'}"
        incidents.tampered(INCIDENT, resource, DESCRIPTION)
