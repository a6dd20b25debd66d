"""What an officer's listing of the trail shows: the events it can read.

A row the writer never stores (``storage.audit_rows``: a value of another type, a short
hash, an unknown outcome) was written by someone with access to the database. It is
left out of QueryEvents and ExportEvents, since nothing in it can be trusted to show,
and reported rather than silently dropped:

* one ``audit-tampered`` incident per listing, at the first such row and before the
  listing goes on, naming that row's sequence (``medvault audit verify`` names them
  all). One per listing, not one per row: the incident is appended to the trail the
  listing reads, so a database writer who also forges each new incident row would
  otherwise make an ascending listing chase its own reports without end, and a million
  forged rows would be a million appends. The detector adds its window: a listing that
  meets the same first row again within it reports nothing new.
* The listing fails closed (UNAVAILABLE) when that incident cannot be committed: a
  listing that leaves rows out says so in the trail or not at all.
* A log line per row for the first ``LOGGED_ROWS`` (sequence and field names, never a
  value), then one line with the count, so the log cannot be flooded either.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Final

from service.audit import AuditUnavailableError
from service.incidents import IncidentDetector
from storage import ChainedEvent

logger = logging.getLogger(__name__)
INCIDENT: Final = "audit-tampered"
LOGGED_ROWS: Final = 10


def _description(sequence: int | None) -> str:
    where = f"the first at sequence {sequence}" if sequence is not None else "the first unnumbered"
    return (
        "audit event rows hold values the audit writer never stores (changed in the "
        f"database), {where}; they were left out of a listing: run `medvault audit verify`"
    )


def _report(incidents: IncidentDetector, sequence: int | None) -> None:
    resource = f"audit/{sequence if sequence is not None else 'unreadable'}"
    try:
        incidents.tampered(INCIDENT, resource, _description(sequence), required=True)
    except AuditUnavailableError as e:
        raise AuditUnavailableError(
            "audit rows left out of this listing could not be reported in the trail; "
            "the listing is stopped: run `medvault audit verify`"
        ) from e


def readable(events: Iterable[ChainedEvent], incidents: IncidentDetector) -> Iterator[ChainedEvent]:
    """``events`` without the malformed ones, which are logged and reported (module doc).

    ``AuditUnavailableError`` when the trail cannot commit the report.
    """
    left_out = 0
    try:
        for event in events:
            if not event.malformed:
                yield event
                continue
            left_out += 1
            sequence = None if "sequence" in event.malformed else event.sequence
            if left_out <= LOGGED_ROWS:
                logger.warning(
                    "audit event unreadable, left out of the listing; run `medvault audit verify`",
                    extra={"sequence": sequence, "fields": ",".join(event.malformed)},
                )
            if left_out == 1:
                _report(incidents, sequence)
    finally:
        if left_out > LOGGED_ROWS:
            logger.warning(
                "audit events unreadable, left out of the listing; run `medvault audit verify`",
                extra={"rows": left_out},
            )
