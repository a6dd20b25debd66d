"""docs/security.md and docs/audit.md agree with each other and with the tool.

The permission tables are checked against the code's RPC table and the hand-written
role matrix; the officer's commands, column headers and markers against the CLI and the
store. A doc that drifts from the tool fails here instead of misleading an officer.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from service.authz.permissions import KNOWN_PERMISSIONS, RPC_PERMISSIONS
from service.cli import access_cmd, audit_cmd
from service.cli.main import parser
from service.convert_audit import opened_note
from storage.break_glass import TAMPERED_MARK
from storage.grants import ALTERED_MARK, LEGACY_MARK, REVIEW_ALTERED_MARK
from storage.grants_model import Grant
from tests.unit.service.authz_matrix import EXPECTED, ROLES

DOCS = Path(__file__).resolve().parents[3] / "docs"
SECURITY = (DOCS / "security.md").read_text()
AUDIT = (DOCS / "audit.md").read_text()
_CELLS = {"patient": "patient", "yes": "allow", "-": "deny"}


def _table_rows(text: str, first_header: str) -> list[list[str]]:
    """The body rows of every markdown table whose first header cell is ``first_header``."""
    rows: list[list[str]] = []
    inside = False
    for line in text.splitlines():
        if not line.startswith("|"):
            inside = False
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not inside:
            inside = cells[0] == first_header
            header = True
        elif header:
            header = False  # the |---| rule
        else:
            rows.append(cells)
    return rows


def _methods(cell: str) -> list[str]:
    """``Service/A, B`` or ``A, B`` -> full method names known to the code."""
    service = cell.split("/", maxsplit=1)[0] if "/" in cell else None
    names = [n.strip().split("/")[-1] for n in cell.split(",")]
    found = []
    for name in names:
        matches = [m for m in RPC_PERMISSIONS
                   if m.endswith("/" + name) and (service is None or f".{service}/" in m)]
        assert len(matches) == 1, f"{name!r} names {len(matches)} RPCs"
        found.append(matches[0])
    return found


def test_rpc_permission_table_is_the_code_table() -> None:
    documented: dict[str, str] = {}
    # The role matrix shares the first header; it has a column per role.
    for cell, permission in (r for r in _table_rows(SECURITY, "RPC") if len(r) == 2):
        for method in _methods(cell):
            documented[method] = permission.strip("`")
    assert documented == dict(RPC_PERMISSIONS)


def test_no_existing_permission_is_called_reserved() -> None:
    for line in (SECURITY + AUDIT).splitlines():
        if "reserved" in line.lower():
            named = {p for p in KNOWN_PERMISSIONS if p in line}
            assert not named, f"called reserved but exist: {sorted(named)}"


def test_role_matrix_is_the_expected_one() -> None:
    rows = [r for r in _table_rows(SECURITY, "RPC") if len(r) == len(ROLES) + 1]
    documented: dict[str, dict[str, str]] = {role: {} for role in ROLES}
    for cell, *outcomes in rows:
        for method in _methods(cell):
            for role, outcome in zip(ROLES, outcomes, strict=True):
                documented[role][method] = _CELLS[outcome]
    assert documented == EXPECTED


def _subcommands() -> dict[str, set[str]]:
    top = parser()
    groups: dict[str, set[str]] = {}
    for action in top._subparsers._group_actions:  # type: ignore[union-attr]
        assert isinstance(action, argparse._SubParsersAction)
        for name, sub in action.choices.items():
            inner = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
            groups[name] = set(inner[0].choices) if inner else set()
    return groups


@pytest.mark.parametrize("doc", ["security.md", "audit.md"])
def test_every_officer_command_named_exists(doc: str) -> None:
    groups = _subcommands()
    text = (DOCS / doc).read_text()
    named = set(re.findall(r"medvault (audit|access) ([a-z][a-z-]*)", text))
    assert named, "no command found"
    missing = {f"{g} {c}" for g, c in named if c not in groups[g]}
    assert not missing


def _example_header(command: str) -> list[str]:
    """The header row printed under the first ``$ medvault <command>`` example."""
    lines = SECURITY.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"$ medvault {command}"))
    return lines[start + 1].split()


def test_example_tables_have_the_cli_columns() -> None:
    assert _example_header("audit query") == audit_cmd.EVENT_HEADERS
    assert _example_header("audit review") == audit_cmd.REVIEW_HEADERS
    assert _example_header("access list") == access_cmd.LIST_HEADERS


def test_markers_and_audit_reason_are_documented_as_the_code_writes_them() -> None:
    for mark in (TAMPERED_MARK, ALTERED_MARK, REVIEW_ALTERED_MARK, LEGACY_MARK,
                 access_cmd.ALTERED):
        assert mark in SECURITY.replace("\n", " "), mark
    grant = Grant(
        id="0" * 32, patient_index=bytes(32), principal="p", granted_by="p",
        created_at=None, expires_at=None, revoked_at=None, revoked_by=None,  # type: ignore[arg-type]
        break_glass=True, reason="r", reviewed_at=None, reviewed_by=None, review_comment="c",
    )  # fmt: skip
    other = Grant(**{**{f: getattr(grant, f) for f in grant.__slots__}, "review_comment": None})
    marked = Grant(**{**{f: getattr(grant, f) for f in grant.__slots__},
                      "reason": TAMPERED_MARK, "review_comment": REVIEW_ALTERED_MARK})
    note = opened_note([grant, other, marked])  # markers are not sealed text shown
    assert note == "sealed text shown: 2 break-the-glass reasons, 1 review comment"
    for text in (SECURITY, AUDIT):
        assert note in text.replace("\n", " ")
