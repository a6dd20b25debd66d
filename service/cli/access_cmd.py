"""``medvault access grant|revoke|list|break-glass`` and ``medvault whoami``.

``access list`` shows the patient as the caller named it (``--patient``) or, listing by
principal, as a prefix of its blind index: the service stores no identifier to show.
Break-the-glass reasons and reviews appear only for a caller holding ``audit.review``
(the service opens them, and audits that it did); for others those cells stay empty.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from typing import Any

from service._gen.medvault.v1 import access_pb2 as pb
from service._gen.medvault.v1 import access_pb2_grpc as pb_grpc
from service._gen.medvault.v1 import records_pb2
from service.cli.client import add_connection_flags, channel
from service.cli.options import (
    add_authority_flag,
    add_patient_flags,
    parse_iso,
    patient_id,
    positive_int,
)
from service.cli.tables import print_table, utc

INDEX_PREFIX = 12  # hex digits of a blind index shown (as in ``audit review``)
LIST_SHRINK = (1, 7, 9, 8)  # PRINCIPAL, BY, REVIEW, REASON: the reason keeps width longest
ALTERED = "ALTERED (grants nothing)"


def _stub(ns: argparse.Namespace) -> pb_grpc.AccessServiceStub:
    return pb_grpc.AccessServiceStub(channel(ns))


def _required_patient(ns: argparse.Namespace) -> records_pb2.PatientId:
    patient = patient_id(ns)
    if patient is None:
        raise SystemExit("medvault: --patient is required")
    return patient


def expiry(ns: argparse.Namespace, now: datetime | None = None) -> datetime | None:
    """When a grant should expire: ``--expires`` or now + ``--for`` hours; None for never."""
    if ns.expires is not None:
        value: datetime = ns.expires
        return value
    if ns.hours is not None:
        return (now or datetime.now(UTC)) + timedelta(hours=ns.hours)
    return None


def grant_state(grant: pb.Grant, now: datetime | None = None) -> str:
    """``active``, ``expired``, ``revoked by X``, or ``ALTERED`` for a row that failed its check."""
    if grant.altered:
        return ALTERED
    if grant.HasField("revoked_at"):
        return f"revoked by {grant.revoked_by}" if grant.revoked_by else "revoked"
    moment = now or datetime.now(UTC)
    if grant.HasField("expires_at") and grant.expires_at.ToDatetime(tzinfo=UTC) <= moment:
        return "expired"
    return "active"


def _print_grant(verb: str, grant: pb.Grant) -> None:
    kind = "break-the-glass grant" if grant.break_glass else "grant"
    until = utc(grant.expires_at) if grant.HasField("expires_at") else "no expiry"
    print(f"{verb} {kind} {grant.id} for {grant.principal} (until {until}; "
          f"{grant_state(grant)})")


def cmd_grant(ns: argparse.Namespace) -> int:
    """Give a principal care-team access to a patient's records."""
    request = pb.GrantAccessRequest(patient=_required_patient(ns), principal=ns.to)
    expires = expiry(ns)
    if expires is not None:
        if expires <= datetime.now(UTC):
            raise SystemExit("medvault: the expiry is in the past")
        request.expires_at.FromDatetime(expires.astimezone(UTC))
    _print_grant("created", _stub(ns).GrantAccess(request))
    return 0


def cmd_revoke(ns: argparse.Namespace) -> int:
    """End a grant now."""
    _print_grant("revoked", _stub(ns).RevokeAccess(pb.RevokeAccessRequest(grant_id=ns.grant_id)))
    return 0


def patient_cell(grant: pb.Grant) -> str:
    """``ID^AUTHORITY`` when the caller named the patient, else the blind-index prefix."""
    if grant.HasField("patient") and grant.patient.id:
        return f"{grant.patient.id}^{grant.patient.assigning_authority}"
    return grant.patient_index[:INDEX_PREFIX] or "-"


def review_cell(grant: pb.Grant) -> str:
    """A break-the-glass grant's review as the service showed it (officers only)."""
    if grant.altered:
        return ""
    if grant.reviewed_by:
        return f"{grant.reviewed_by}: {grant.review_comment}"  # when: audit review --all
    # Unreviewed, or a review in the database that did not authenticate (a marker).
    return grant.review_comment or ("pending" if grant.break_glass and grant.reason else "")


def grant_row(grant: pb.Grant) -> list[object]:
    """One row of the ``access list`` table."""
    return [
        grant.id, grant.principal, patient_cell(grant),
        "break-glass" if grant.break_glass else "care-team",
        utc(grant.created_at), utc(grant.expires_at) if grant.HasField("expires_at") else "-",
        grant_state(grant), grant.granted_by, grant.reason, review_cell(grant),
    ]  # fmt: skip


LIST_HEADERS = ["GRANT", "PRINCIPAL", "PATIENT", "KIND", "CREATED", "EXPIRES", "STATE", "BY",
                "REASON", "REVIEW"]  # fmt: skip


def cmd_list(ns: argparse.Namespace) -> int:
    """A patient's grants, or a principal's."""
    request = pb.ListGrantsRequest(principal=ns.principal or "", include_inactive=ns.all)
    patient = patient_id(ns)
    if patient is not None:
        request.patient.CopyFrom(patient)
    grants = _stub(ns).ListGrants(request).grants
    rows = (grant_row(g) for g in grants)
    print_table(LIST_HEADERS, rows, max_widths={8: 50, 9: 60}, shrink=LIST_SHRINK)
    return 0


def cmd_break_glass(ns: argparse.Namespace) -> int:
    """Open time-limited emergency access to a patient; flagged for review."""
    reason = ns.reason.strip()
    if not reason:
        raise SystemExit("medvault: --reason must say why normal access is not enough")
    request = pb.BreakGlassRequest(
        patient=_required_patient(ns), reason=reason,
        duration_seconds=ns.minutes * 60 if ns.minutes else 0,
    )  # fmt: skip
    grant = _stub(ns).BreakGlass(request)
    _print_grant("opened", grant)
    print("this access is audited and will be reviewed by a security officer")
    return 0


def cmd_whoami(ns: argparse.Namespace) -> int:
    """Who the service thinks the caller is, and what they may do."""
    me = _stub(ns).WhoAmI(pb.WhoAmIRequest())
    print(f"principal:   {me.principal}")
    print(f"via:         {me.application or '-'}")
    print(f"roles:       {', '.join(me.roles) or '-'}")
    print(f"permissions: {', '.join(sorted(me.permissions)) or '-'}")
    return 0


def _access_commands(access: Any) -> list[argparse.ArgumentParser]:
    grant = access.add_parser("grant", help="give a principal care-team access to a patient")
    add_patient_flags(grant, required=True)
    grant.add_argument("--to", required=True, metavar="PRINCIPAL", help="person or application")
    until = grant.add_mutually_exclusive_group()
    until.add_argument("--expires", type=parse_iso, help="ISO-8601 expiry (UTC if no zone)")
    until.add_argument("--for", dest="hours", type=positive_int, metavar="HOURS",
                       help="expire after this many hours")
    grant.set_defaults(func=cmd_grant)
    revoke = access.add_parser("revoke", help="end a grant")
    revoke.add_argument("grant_id", help="grant id: 32 hex digits, as access grant prints it")
    revoke.set_defaults(func=cmd_revoke)
    listing = access.add_parser("list", help="a patient's or a principal's grants")
    whose = listing.add_mutually_exclusive_group(required=True)
    whose.add_argument("--patient", help="patient identifier (with --authority)")
    whose.add_argument("--principal", help="person or application")
    add_authority_flag(listing)
    listing.add_argument("--all", action="store_true", help="include revoked and expired")
    listing.set_defaults(func=cmd_list)
    glass = access.add_parser("break-glass", help="emergency access to a patient (reviewed)")
    add_patient_flags(glass, required=True)
    glass.add_argument("--reason", required=True, help="why normal access is not enough")
    glass.add_argument("--minutes", type=positive_int, help="duration (policy caps it)")
    glass.set_defaults(func=cmd_break_glass)
    return [grant, revoke, listing, glass]


def register(sub: Any) -> None:
    """Add ``access`` (grant, revoke, list, break-glass) and ``whoami`` to the CLI."""
    access = sub.add_parser("access", help="care-team grants and break-the-glass")
    commands = access.add_subparsers(dest="access_command", required=True)
    whoami = sub.add_parser("whoami", help="your principal, roles and permissions")
    whoami.set_defaults(func=cmd_whoami)
    for parser in [*_access_commands(commands), whoami]:
        add_connection_flags(parser)
