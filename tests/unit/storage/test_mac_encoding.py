"""``storage.mac_encoding``: one instant has one encoding, whatever its zone.

Grant and run-ledger MACs cover times through ``time_field``; it measured an aware time
from the epoch *in the time's own zone*, so one instant written as 03:00+01:00 and read
back as 02:00 UTC gave two encodings (one hour apart) and the MAC failed. Callers pass
UTC today; the module's docstring promises any zone (cold review 9h).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from storage.mac_encoding import length_prefixed, time_field

INSTANT = datetime(2026, 11, 1, 2, 0, 0, 123456, tzinfo=UTC)


@pytest.mark.parametrize("hours", [1, -5, 14])
def test_one_instant_has_one_encoding_in_any_zone(hours: int) -> None:
    zone = timezone(timedelta(hours=hours))
    assert time_field(INSTANT.astimezone(zone)) == time_field(INSTANT)


def test_the_bytes_of_utc_naive_and_none_are_unchanged() -> None:
    """Rows MACed so far (UTC) keep verifying."""
    assert time_field(INSTANT) == b"1793498400123456"
    assert time_field(INSTANT.replace(tzinfo=None)) == b"1793498400123456"
    assert time_field(None) == b"-1"
    assert length_prefixed([b"ab", b""]) == b"\x00\x00\x00\x02ab\x00\x00\x00\x00"
