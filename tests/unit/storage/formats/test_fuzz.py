"""Property-based fuzzing of the content validators (hypothesis).

Every outcome of a put's content check must be one of two: the content is accepted, or
it is refused with ``InvalidRecordError`` on field ``content`` whose message quotes
nothing from the content. Any other exception would reach the caller as INTERNAL (or
kill a worker); a hang would hold an upload slot. The inputs are hostile: random bytes,
and valid records of each kind mutated (bytes flipped, cut, spliced, repeated) and fed
in random chunkings. The verdict must not depend on where the chunks are cut: a
streaming parser that misreads a boundary would accept or refuse by accident.

The budget is small in CI (``max_examples`` below); ``bench/fuzz.sh`` runs the same
properties with a large budget (``MEDVAULT_FUZZ_EXAMPLES``).
"""

from __future__ import annotations

import functools
import itertools
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.errors import InvalidRecordError
from storage.formats import checked, validator_for
from storage.model import PatientRef, RecordKind
from tests import content
from tests.unit.storage.formats.helpers import PATIENT

KINDS = [RecordKind.DICOM, RecordKind.HL7V2, RecordKind.CDA, RecordKind.FHIR, RecordKind.PDF]
EXAMPLES = int(os.environ.get("MEDVAULT_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a shared, noisy machine; hangs are caught by pytest-timeout instead
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=os.environ.get("MEDVAULT_FUZZ_RANDOM") != "1",  # CI: reproducible
)
# Distinctive content the refusals must never quote back.
MARKER = "ZQXJ7731"
MARKED = PatientRef(f"{MARKER}01", "urn:oid:2.999.42.1")


@functools.cache
def _valid(kind: RecordKind, patient: PatientRef = PATIENT) -> bytes:
    """One record per kind and patient (the factories draw new UIDs on every call, and
    hypothesis needs the same input to replay a failing case)."""
    return content.content(kind.value, patient.id, patient.authority)


def _verdict(kind: RecordKind, pieces: list[bytes], patient: PatientRef = PATIENT) -> str:
    """``"accepted"`` or the refusal's problem; any other exception fails the test."""
    validator = validator_for(kind, patient)
    try:
        for _ in checked(pieces, validator):
            pass
    except InvalidRecordError as e:
        refusal = e
    else:
        return "accepted"
    assert refusal.field == "content", refusal.field
    return refusal.problem


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@st.composite
def mutated(draw: st.DrawFn, kind: RecordKind) -> bytes:
    """A valid record of ``kind`` with a few hostile edits."""
    data = bytearray(_valid(kind, MARKED))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "splice", "repeat", "zero"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at:]
        elif op == "splice":
            data[at:at] = draw(st.binary(max_size=64))
        elif op == "repeat":
            span = data[at : at + draw(st.integers(1, 32))]
            data[at:at] = span * draw(st.integers(2, 50))
        elif op == "zero":
            end = at + draw(st.integers(1, 64))
            data[at:end] = bytes(len(data[at:end]))
    return bytes(data)


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_are_refused_cleanly(kind: RecordKind, data: bytes) -> None:
    assert _verdict(kind, [data]) != "accepted" or kind is RecordKind.PDF


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.data())
def test_mutated_records_get_a_clean_verdict_whatever_the_chunking(
    kind: RecordKind, data: st.DataObject
) -> None:
    body = data.draw(mutated(kind))
    whole = _verdict(kind, [body], MARKED)
    cuts = data.draw(st.lists(st.integers(0, 1 << 20), max_size=12))
    pieces = _verdict(kind, _split(body, cuts), MARKED)
    # The wording may differ (a parser names what it saw first), the verdict may not.
    assert (pieces == "accepted") == (whole == "accepted"), (whole, pieces)
    assert MARKER not in whole + pieces, "a refusal quoted the content"


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(cuts=st.lists(st.integers(0, 1 << 20), max_size=20))
def test_a_valid_record_is_accepted_in_any_chunking(kind: RecordKind, cuts: list[int]) -> None:
    body = _valid(kind)
    assert _verdict(kind, _split(body, cuts)) == "accepted"
