"""``medvault audit ...``: the security officer's tools over ``AuditService``.

query, verify, export, review (the break-the-glass queue), and three reports built on
``QueryEvents``: disclosure (who read one patient's records), denied (denied-access
summary) and top-readers. Every one of these calls is itself audited by the service.
Patients appear only as a prefix of their blind index, never by identifier. The
break-the-glass reasons and review comments that ``review`` shows are opened by the
service for a caller holding ``audit.review``, and that reading is audited too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from service._gen.medvault.v1 import audit_pb2 as pb
from service._gen.medvault.v1 import audit_pb2_grpc as pb_grpc
from service.cli import audit_reports as reports
from service.cli.client import add_connection_flags, channel
from service.cli.options import (
    add_patient_flags,
    add_time_flags,
    non_negative_int,
    patient_id,
    positive_int,
)
from service.cli.tables import print_table, short_ids, utc

OUTCOMES = {"allowed": pb.OUTCOME_ALLOWED, "denied": pb.OUTCOME_DENIED,
            "failed": pb.OUTCOME_FAILED}  # fmt: skip
FORMATS = {"jsonl": pb.EXPORT_FORMAT_JSONL, "csv": pb.EXPORT_FORMAT_CSV,
           "fhir": pb.EXPORT_FORMAT_FHIR}  # fmt: skip
INDEX_PREFIX = 12  # hex digits of a blind index shown in tables
REASON_WIDTH = 60
# Table columns that give up width on a narrow terminal, first to last: the free text
# (reason, comment) goes last, so ids and names are cut before it is.
QUERY_SHRINK = (5, 3, 6, 2, 4, 7)  # RESOURCE, ROLE, OUTCOME, PRINCIPAL, ACTION, REASON
REVIEW_SHRINK = (2, 6, 7, 5)  # WHO, REVIEWED, COMMENT, REASON


def plural(count: int, noun: str) -> str:
    """``1 event``, ``2 events``."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _stub(ns: argparse.Namespace) -> pb_grpc.AuditServiceStub:
    return pb_grpc.AuditServiceStub(channel(ns))


def query_request(ns: argparse.Namespace, **fixed: Any) -> pb.QueryEventsRequest:
    """The QueryEventsRequest the filter flags describe; ``fixed`` fields override them."""
    request = pb.QueryEventsRequest(
        principal=getattr(ns, "principal", None) or "",
        action=getattr(ns, "action", None) or "",
        outcome=OUTCOMES.get(getattr(ns, "outcome", None) or "", pb.OUTCOME_UNSPECIFIED),
        limit=getattr(ns, "limit", 0) or 0,
    )
    patient = patient_id(ns)
    if patient is not None:
        request.patient.CopyFrom(patient)
    for name in ("since", "until"):
        value: datetime | None = getattr(ns, name, None)
        if value is not None:
            getattr(request, name).FromDatetime(value.astimezone(UTC))
    for name, value in fixed.items():
        setattr(request, name, value)
    return request


def outcome_text(event: pb.AuditEvent) -> str:
    """``allowed``, or ``denied/PERMISSION_DENIED`` style for the others."""
    name = pb.Outcome.Name(event.outcome).removeprefix("OUTCOME_").lower()
    return f"{name}/{event.status}" if event.status and name != "allowed" else name


def event_row(event: pb.AuditEvent, *, full_ids: bool = False) -> list[object]:
    """One row of the ``audit query`` table; 32-hex ids shortened unless ``full_ids``."""
    resource, reason = event.resource, event.reason
    if not full_ids:
        # A 32-hex grant or record id would take most of the reason column: 8 digits
        # tell events apart on screen; --full-ids or export give the whole id.
        resource, reason = short_ids(resource), short_ids(reason)
    return [
        event.sequence, utc(event.time), reports.who(event), event.role, event.action,
        resource, outcome_text(event), reason,
    ]  # fmt: skip


EVENT_HEADERS = ["SEQ", "TIME", "PRINCIPAL", "ROLE", "ACTION", "RESOURCE", "OUTCOME", "REASON"]
REVIEW_HEADERS = ["GRANT", "WHEN", "WHO", "ROLE", "PATIENT", "REASON", "REVIEWED", "COMMENT"]


def cmd_query(ns: argparse.Namespace) -> int:
    """Print the events matching the filters, oldest first."""
    events = _stub(ns).QueryEvents(query_request(ns))
    shown = print_table(
        EVENT_HEADERS, (event_row(e, full_ids=ns.full_ids) for e in events),
        max_widths={2: 40, 5: 48, 7: REASON_WIDTH}, numeric=[0], shrink=QUERY_SHRINK,
    )  # fmt: skip
    note = " (limit reached; --limit 0 for all)" if ns.limit and shown >= ns.limit else ""
    print(f"{plural(shown, 'event')}{note}", file=sys.stderr)
    return 0


def cmd_verify(ns: argparse.Namespace) -> int:
    """Verify the hash chain and checkpoints; exit 1 at the first bad sequence."""
    result = _stub(ns).VerifyChain(pb.VerifyChainRequest())
    if not result.ok:
        # Sequence 0: nothing bad found, but the check was incomplete (witness unreadable).
        where = f" at sequence {result.first_bad_sequence}" if result.first_bad_sequence else ""
        print(f"FAILED{where}: {result.reason} "
              f"({plural(result.events_checked, 'event')} checked)")
        return 1
    last = result.last_checkpoint_sequence
    tail = max(0, result.events_checked - last)
    print(f"OK: {plural(result.events_checked, 'event')}, "
          f"{plural(result.checkpoints_checked, 'checkpoint')} verified; "
          f"last checkpoint at sequence {last or '-'}")
    if result.reason.startswith("chain intact; "):
        print(result.reason.removeprefix("chain intact; "))
    if tail:
        print(f"note: {plural(tail, 'event')} after the last checkpoint "
              "(protected by the head row only)")
    return 0


def _write_private(path: Path, chunks: Iterable[bytes]) -> int:
    """Write ``chunks`` to ``path`` via a 0600 ``.partial`` file; the bytes written."""
    partial = path.with_name(path.name + ".partial")
    written = 0
    # A fresh file (O_EXCL): an old .partial or a planted symlink keeps no say over the mode.
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f, tqdm(
            unit="B", unit_scale=True, desc="export", file=sys.stderr,
            disable=not sys.stderr.isatty(),
        ) as bar:  # fmt: skip
            for chunk in chunks:
                f.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return written


def cmd_export(ns: argparse.Namespace) -> int:
    """Stream ExportEvents into ``-o FILE`` (readable by the owner only)."""
    request = pb.ExportEventsRequest(query=query_request(ns), format=FORMATS[ns.format])
    stream = _stub(ns).ExportEvents(request)
    written = _write_private(Path(ns.output), (chunk.data for chunk in stream))
    print(f"wrote {written} bytes ({ns.format}) to {ns.output}")
    return 0


def _review_state(item: pb.BreakGlassReviewItem) -> str:
    if not item.reviewed:
        return "no"
    return f"yes, {item.reviewed_by} {utc(item.reviewed_at)}"


def cmd_review(ns: argparse.Namespace) -> int:
    """List the break-the-glass queue, or mark GRANT_ID reviewed with --comment."""
    stub = _stub(ns)
    if ns.grant_id:
        if not ns.comment or not ns.comment.strip():
            raise SystemExit("medvault: audit review GRANT_ID needs --comment TEXT")
        item = stub.ReviewBreakGlass(
            pb.ReviewBreakGlassRequest(grant_id=ns.grant_id, comment=ns.comment.strip())
        )
        print(f"grant {item.grant_id} reviewed by {item.reviewed_by} at {utc(item.reviewed_at)}")
        return 0
    if ns.comment:
        raise SystemExit("medvault: --comment needs a GRANT_ID")
    items = stub.ListBreakGlass(pb.ListBreakGlassRequest(include_reviewed=ns.all)).items
    rows = (
        [i.grant_id, utc(i.event.time), reports.who(i.event), i.event.role or "-",
         i.event.patient_index[:INDEX_PREFIX], i.event.reason, _review_state(i), i.comment]
        for i in items
    )  # fmt: skip
    shown = print_table(REVIEW_HEADERS, rows, max_widths={5: 50, 7: 50}, shrink=REVIEW_SHRINK)
    print(plural(shown, "break-the-glass grant") + ("" if ns.all else " awaiting review"),
          file=sys.stderr)
    return 0


def cmd_disclosure(ns: argparse.Namespace) -> int:
    """Who read this patient's records, when, and why."""
    events = _stub(ns).QueryEvents(query_request(ns, outcome=pb.OUTCOME_ALLOWED))
    rows = (
        [e.principal, e.application or "-", e.role,
         utc(e.time), e.action, e.resource, e.reason]
        for e in reports.disclosures(events)
    )  # fmt: skip
    headers = ["PRINCIPAL", "VIA", "ROLE", "WHEN", "ACTION", "RESOURCE", "REASON"]
    shown = print_table(headers, rows, max_widths={5: 48, 6: 60})
    print(plural(shown, "disclosure"), file=sys.stderr)
    return 0


def cmd_denied(ns: argparse.Namespace) -> int:
    """Denied calls grouped by principal, host and action, most frequent first."""
    events = _stub(ns).QueryEvents(query_request(ns, outcome=pb.OUTCOME_DENIED))
    groups = reports.denied_summary(events)
    rows = (
        [g.count, g.principal, g.source, g.action, ",".join(sorted(g.statuses)),
         utc(datetime.fromtimestamp(g.last_seconds, UTC))]
        for g in groups
    )  # fmt: skip
    print_table(["COUNT", "PRINCIPAL", "SOURCE", "ACTION", "STATUS", "LAST"], rows, numeric=[0])
    total = sum(g.count for g in groups)
    print(f"{plural(total, 'denied call')} in {plural(len(groups), 'group')}", file=sys.stderr)
    return 0


def cmd_top_readers(ns: argparse.Namespace) -> int:
    """The principals with the most allowed record reads."""
    request = query_request(ns, action="records.read", outcome=pb.OUTCOME_ALLOWED, limit=0)
    readers = reports.top_readers(_stub(ns).QueryEvents(request), ns.limit)
    rows = (
        [r.principal, r.reads, len(r.patients), utc(datetime.fromtimestamp(r.last_seconds, UTC))]
        for r in readers
    )
    print_table(["PRINCIPAL", "READS", "PATIENTS", "LAST READ"], rows, numeric=[1, 2])
    return 0


def _with(parser: argparse.ArgumentParser, func: Any) -> argparse.ArgumentParser:
    parser.set_defaults(func=func)
    return parser


def _add_filters(p: argparse.ArgumentParser, *, limit: int) -> None:
    add_time_flags(p)
    p.add_argument("--principal", help="person or application name")
    add_patient_flags(p, required=False)
    p.add_argument("--action", help="e.g. records.read, access.break_glass, incident")
    p.add_argument("--outcome", choices=sorted(OUTCOMES),
                   help="allowed, denied (refused by policy or scope) or failed (an error)")
    p.add_argument(
        "--limit", type=non_negative_int, default=limit,
        help=f"most events (default {limit}; 0 means no limit)",
    )  # fmt: skip


def _commands(audit: Any) -> Iterator[argparse.ArgumentParser]:
    """Add each ``audit`` sub-command; yields the parsers for the connection flags."""
    query = audit.add_parser("query", help="events matching filters, as a table")
    _add_filters(query, limit=1000)
    query.add_argument(
        "--full-ids", action="store_true",
        help="print record and grant ids whole (default: first 8 hex digits and …)",
    )  # fmt: skip
    yield _with(query, cmd_query)
    verify = audit.add_parser("verify", help="verify the hash chain and signed checkpoints")
    yield _with(verify, cmd_verify)
    export = audit.add_parser("export", help="events to a file: JSON lines, CSV or FHIR")
    export.add_argument("--format", required=True, choices=sorted(FORMATS),
                        help="jsonl (one event per line), csv, or fhir (R4 AuditEvent bundle)")
    export.add_argument("-o", "--output", required=True, help="file to write (mode 0600)")
    _add_filters(export, limit=0)
    yield _with(export, cmd_export)
    review = audit.add_parser("review", help="break-the-glass review queue; mark one reviewed")
    review.add_argument("grant_id", nargs="?", help="grant to mark reviewed (with --comment)")
    review.add_argument("--comment", help="review finding (audited)")
    review.add_argument("--all", action="store_true", help="include reviewed grants")
    yield _with(review, cmd_review)
    disclosure = audit.add_parser("disclosure", help="who read one patient's records")
    add_patient_flags(disclosure, required=True)
    add_time_flags(disclosure)
    yield _with(disclosure, cmd_disclosure)
    denied = audit.add_parser("denied", help="denied-access summary")
    add_time_flags(denied)
    yield _with(denied, cmd_denied)
    top = audit.add_parser("top-readers", help="principals by number of record reads")
    add_time_flags(top)
    top.add_argument("--limit", type=positive_int, default=10, help="how many (default 10)")
    yield _with(top, cmd_top_readers)


def register(sub: Any) -> None:
    """Add ``audit`` and its sub-commands to the CLI."""
    audit = sub.add_parser("audit", help="security officer's tools over the audit trail")
    commands = audit.add_subparsers(dest="audit_command", required=True)
    for parser in _commands(commands):
        add_connection_flags(parser)
