"""The canonical encoding written key by key is byte for byte what ``json.dumps`` makes.

``canonical_bytes`` builds the JSON text itself (the audit writer encodes every event it
commits); every hash in every existing chain was made with ``json.dumps`` of
``event_document``. These tests compare the two over arbitrary text, times and indexes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from storage.audit_model import (
    AuditEntry,
    canonical_bytes,
    chain_hash,
    event_document,
    format_time,
)
from tests.unit.storage.audit_vectors import OLD_CHAIN, OLD_HEAD, old_chain

TEXT_FIELDS = (
    "principal",
    "action",
    "resource",
    "role",
    "application",
    "status",
    "reason",
    "source",
)
TEXT = st.text()  # any code point: controls, quotes, backslashes, non-ASCII, surrogates
TIMES = st.datetimes(
    min_value=datetime(1, 1, 2, 0, 0),  # UTC+05:30 of Jan 1st, year 1 is year 0
    max_value=datetime(9998, 12, 31, 0, 0),  # astimezone(UTC) must stay within year 9999
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]),
)


def dumped(sequence: int, entry: AuditEntry) -> bytes:
    """The encoding as it has always been made (``json.dumps`` of the document)."""
    document = event_document(sequence, entry)
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def result(encode: Callable[[int, AuditEntry], bytes], sequence: int, entry: AuditEntry) -> object:
    """The bytes, or the error: a lone surrogate has no UTF-8 either way (normalise escapes it)."""
    try:
        return encode(sequence, entry)
    except UnicodeEncodeError as e:
        return (type(e), e.start, e.end)


@settings(max_examples=500)  # every existing hash depends on these bytes
@given(
    sequence=st.integers(min_value=0, max_value=2**63 - 1),
    time=TIMES,
    fields=st.fixed_dictionaries(dict.fromkeys(TEXT_FIELDS, TEXT)),
    outcome=st.sampled_from(["allowed", "denied", "failed"]),
    patient_index=st.none() | st.binary(min_size=32, max_size=32),
)
def test_written_encoding_equals_json_dumps(
    sequence: int,
    time: datetime,
    fields: dict[str, str],
    outcome: str,
    patient_index: bytes | None,
) -> None:
    entry = AuditEntry(
        time=time,
        outcome=outcome,  # type: ignore[arg-type]
        patient_index=patient_index,
        **fields,
    )
    assert result(canonical_bytes, sequence, entry) == result(dumped, sequence, entry)


@given(time=TIMES)
def test_time_text_equals_strftime(time: datetime) -> None:
    assert format_time(time) == time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_documented_example() -> None:
    """The example of docs/audit.md, byte for byte."""
    entry = AuditEntry(
        time=datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC), principal="dr-0", action="PutRecord",
        resource="rec-0", outcome="denied", role="physician", application="his",
        patient_index=bytes([0xAB]) * 32, status="OK", reason="break glass: é",
        source="127.0.0.1",
    )  # fmt: skip
    expected = (
        '{"action":"PutRecord","application":"his","outcome":"denied","patient_index":"'
        + "ab" * 32
        + '","principal":"dr-0","reason":"break glass: é","resource":"rec-0",'
        '"role":"physician","sequence":7,"source":"127.0.0.1","status":"OK",'
        '"time":"2026-01-02T03:04:05.000006Z"}'
    )
    assert canonical_bytes(7, entry) == expected.encode()


def test_a_field_of_another_type_is_encoded_as_json_dumps_does() -> None:
    """Not text where the entry declares text (a caller's mistake): the old encoding."""
    entry = AuditEntry(
        time=datetime(2026, 1, 2, tzinfo=UTC), principal="p", action="a", resource="r",
        outcome="allowed", reason=5,  # type: ignore[arg-type]
    )  # fmt: skip
    assert canonical_bytes(1, entry) == dumped(1, entry)
    assert b'"reason":5' in canonical_bytes(1, entry)
    assert canonical_bytes(True, entry) == dumped(True, entry)  # json's true


def test_chain_written_by_the_old_encoding_hashes_alike() -> None:
    prev = bytes(32)
    for sequence, (entry, (_, digest)) in enumerate(zip(old_chain(), OLD_CHAIN, strict=True), 1):
        assert hashlib.sha256(canonical_bytes(sequence, entry)).hexdigest()[:16] == digest, sequence
        prev = chain_hash(prev, sequence, entry)
    assert prev.hex() == OLD_HEAD
