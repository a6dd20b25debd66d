"""``medvault access ...`` and ``medvault whoami``: argument parsing and grant display."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta

import pytest

from service._gen.medvault.v1 import access_pb2 as pb
from service.cli import access_cmd
from service.cli.main import parser

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def parse(*argv: str) -> argparse.Namespace:
    return parser().parse_args(list(argv))


def test_grant_with_expiry() -> None:
    ns = parse("access", "grant", "--patient", "P1", "--authority", "H", "--to", "dr-a",
               "--expires", "2026-01-02T10:04:05+07:00")
    assert (ns.patient, ns.authority, ns.to, ns.func) == ("P1", "H", "dr-a", access_cmd.cmd_grant)
    assert access_cmd.expiry(ns) == T0


def test_grant_for_hours_and_no_expiry() -> None:
    ns = parse("access", "grant", "--patient", "P1", "--authority", "H", "--to", "dr-a",
               "--for", "12")
    assert access_cmd.expiry(ns, now=T0) == T0 + timedelta(hours=12)
    ns = parse("access", "grant", "--patient", "P1", "--authority", "H", "--to", "dr-a")
    assert access_cmd.expiry(ns) is None


@pytest.mark.parametrize("argv", [
    ["access", "grant", "--patient", "P1", "--authority", "H"],
    ["access", "grant", "--patient", "P1", "--authority", "H", "--to", "x",
     "--expires", "2026-01-01", "--for", "1"],
    ["access", "grant", "--patient", "P1", "--authority", "H", "--to", "x", "--for", "0"],
    ["access", "grant", "--patient", "P1", "--authority", "H", "--to", "x", "--expires", "soon"],
    ["access", "revoke"],
    ["access", "list"],
    ["access", "list", "--patient", "P1", "--principal", "dr-a"],
    ["access", "break-glass", "--patient", "P1", "--authority", "H"],
    ["access", "break-glass", "--patient", "P1", "--authority", "H", "--reason", "x",
     "--minutes", "-5"],
    ["access"],
])  # fmt: skip
def test_bad_arguments_exit(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse(*argv)


def test_other_forms() -> None:
    assert parse("access", "revoke", "g-1").grant_id == "g-1"
    listing = parse("access", "list", "--principal", "dr-a", "--all")
    assert (listing.principal, listing.patient, listing.all) == ("dr-a", None, True)
    by_patient = parse("access", "list", "--patient", "P1", "--authority", "H")
    assert (by_patient.patient, by_patient.all) == ("P1", False)
    glass = parse("access", "break-glass", "--patient", "P1", "--authority", "H",
                  "--reason", "unconscious in ED", "--minutes", "30")
    assert (glass.reason, glass.minutes, glass.func) == (
        "unconscious in ED", 30, access_cmd.cmd_break_glass,
    )
    assert parse("whoami").func is access_cmd.cmd_whoami


def grant(**fields: object) -> pb.Grant:
    g = pb.Grant(id="g-1", principal="dr-a", granted_by="clerk", **fields)  # type: ignore[arg-type]
    g.created_at.FromDatetime(T0)
    return g


def test_grant_state() -> None:
    active = grant()
    assert access_cmd.grant_state(active, now=T0) == "active"
    expiring = grant()
    expiring.expires_at.FromDatetime(T0 + timedelta(hours=1))
    assert access_cmd.grant_state(expiring, now=T0) == "active"
    assert access_cmd.grant_state(expiring, now=T0 + timedelta(hours=2)) == "expired"
    revoked = grant(revoked_by="admin")
    revoked.revoked_at.FromDatetime(T0)
    assert access_cmd.grant_state(revoked, now=T0) == "revoked by admin"


def test_grant_row_patient_is_the_echoed_identifier_or_the_index_prefix() -> None:
    g = grant(break_glass=True, reason="ED", patient_index="ab" * 32)
    by_principal = access_cmd.grant_row(g)
    assert by_principal[:4] == ["g-1", "dr-a", "ab" * 6, "break-glass"]
    assert "^" not in str(by_principal[2])
    g.patient.id, g.patient.assigning_authority = "P1", "H"
    assert access_cmd.grant_row(g)[2] == "P1^H"


def test_grant_row_reason_review_and_altered() -> None:
    pending = grant(break_glass=True, reason="ED")
    assert access_cmd.grant_row(pending)[8:] == ["ED", "pending"]
    reviewed = grant(break_glass=True, reason="ED", reviewed_by="so-thu",
                     review_comment="confirmed")
    reviewed.reviewed_at.FromDatetime(T0)
    assert access_cmd.review_cell(reviewed) == "so-thu: confirmed"
    not_shown = grant(break_glass=True)  # a caller without audit.review: nothing opened
    assert access_cmd.grant_row(not_shown)[8:] == ["", ""]
    altered = grant(break_glass=True, reason="[altered]", altered=True)
    row = access_cmd.grant_row(altered)
    assert (row[6], row[9]) == (access_cmd.ALTERED, "")
