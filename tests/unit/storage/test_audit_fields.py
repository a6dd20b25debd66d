"""Normalising audit entries: every field storable, escaped, and cut with a visible marker."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from storage.audit_fields import FIELD_WIDTHS, normalise, normalise_text
from storage.audit_model import AuditEntry, canonical_bytes

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def entry(**fields: str) -> AuditEntry:
    base: dict[str, str] = {
        "principal": "dr-house", "action": "records.read", "resource": "record/ab"
    }
    return AuditEntry(time=T0, outcome="allowed", **{**base, **fields})  # type: ignore[arg-type]


def test_ordinary_entry_is_returned_unchanged() -> None:
    plain = entry(role="physician", application="his", source="ipv4:127.0.0.1", reason="ok")
    assert normalise(plain) is plain


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a\x00b", "a\\x00b"),
        ("line\nforged", "line\\x0aforged"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("del\x7f c1\x85", "del\\x7f c1\\x85"),
        ("rtl\u202eevil", "rtl\\u202eevil"),
        ("sep\u2028x", "sep\\u2028x"),
        ("lone\ud800surrogate", "lone\\ud800surrogate"),
        ("Ünïcödé ✓ 日本", "Ünïcödé ✓ 日本"),  # printable text stays as it is
    ],
)
def test_unsafe_characters_are_escaped(raw: str, expected: str) -> None:
    assert normalise_text(raw, 255) == expected


def test_escaped_text_encodes_as_utf8() -> None:
    fixed = normalise(entry(principal="x\ud800\x00", resource="r\udfff"))
    canonical_bytes(1, fixed)  # would raise UnicodeEncodeError on a lone surrogate
    assert "\x00" not in fixed.principal


@pytest.mark.parametrize("field", sorted(FIELD_WIDTHS))
def test_every_field_fits_its_width_with_a_marker(field: str) -> None:
    width = FIELD_WIDTHS[field]
    fixed = normalise(entry(**{field: "x" * (width + 45)}))
    value = getattr(fixed, field)
    assert len(value) == width
    assert value.endswith(f"…[truncated, {width + 45} chars]")
    assert value.startswith("x" * (width // 4))


def test_truncation_never_cuts_an_escape_in_half() -> None:
    for shift in range(8):
        value = normalise_text("a" * shift + "\x00" * 100, 40)
        assert len(value) <= 40
        head = value.split("…[truncated")[0]
        assert head == "a" * shift + "\\x00" * ((len(head) - shift) // 4)


def test_escaping_that_overflows_is_truncated() -> None:
    # 60 NULs fit in 64 raw characters but not once escaped (240 characters).
    value = normalise_text("\x00" * 60, 64)
    assert len(value) <= 64
    assert value.endswith("…[truncated, 60 chars]")


def test_huge_values_cost_no_more_than_their_width() -> None:
    value = normalise_text("\x01" * 4_000_000, 32)
    assert value.endswith("…[truncated, 4000000 chars]")
    assert len(value) <= 32


def test_normalise_is_idempotent() -> None:
    once = normalise(entry(principal="p\x00" * 200, role=",".join(["r"] * 100), reason="\n" * 3))
    assert normalise(once) is once


def test_many_roles_fit_the_role_column() -> None:
    roles = ",".join(f"role-{n}" for n in range(40))
    assert len(normalise(entry(role=roles)).role) == FIELD_WIDTHS["role"]
