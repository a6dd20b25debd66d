"""Sealed record metadata: v1 (legacy) and v2 layouts, and the row binding of v2."""

from __future__ import annotations

import dataclasses
import os
from datetime import UTC, datetime, timedelta

import pytest

from storage.errors import IntegrityError
from storage.model import PatientRef
from storage.row_auth import associated_data
from storage.sealing import META_V1, META_V2, RowFields, SealedFields, row_binding, seal, unseal

DEK = os.urandom(32)
AD = associated_data("ab" * 16, 1)
PATIENT = PatientRef(id="SYNTH-1", authority="urn:oid:2.999.1")
ROW = RowFields(
    patient_index=os.urandom(32), kind="OTHER", content_type="application/octet-stream",
    object_key="objects/" + "cd" * 16, size=10, stored_size=66,
    ciphertext_sha256=os.urandom(32), segment_size=1 << 20,
    created_at=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), created_by="test-app",
    supersedes_version=None,
)  # fmt: skip


def test_v2_round_trip_keeps_every_column() -> None:
    blob = seal(DEK, AD, SealedFields(PATIENT, "title", b"\1" * 32, ROW))
    assert blob[:1] == META_V2
    sealed = unseal(DEK, AD, blob)
    assert sealed.row is not None
    assert row_binding(sealed.row) == row_binding(ROW)
    assert sealed.patient == PATIENT


def test_v1_round_trip_has_no_row() -> None:
    blob = seal(DEK, AD, SealedFields(PATIENT, "title", b"\1" * 32))
    assert blob[:1] == META_V1
    assert unseal(DEK, AD, blob).row is None


@pytest.mark.parametrize("version", [META_V1, META_V2])
def test_version_byte_cannot_be_changed(version: bytes) -> None:
    row = ROW if version == META_V2 else None
    blob = seal(DEK, AD, SealedFields(PATIENT, "t", b"\1" * 32, row))
    for other in (META_V1, META_V2, b"\x03"):
        if other != version:
            with pytest.raises(IntegrityError):
                unseal(DEK, AD, other + blob[1:])


def test_blob_is_bound_to_record_and_version() -> None:
    blob = seal(DEK, AD, SealedFields(PATIENT, "t", b"\1" * 32, ROW))
    for ad in (associated_data("ab" * 16, 2), associated_data("ef" * 16, 1)):
        with pytest.raises(IntegrityError):
            unseal(DEK, ad, blob)


CHANGES = {
    "patient_index": os.urandom(32), "kind": "PDF", "content_type": "text/plain",
    "object_key": "objects/" + "ee" * 16, "size": 11, "stored_size": 67,
    "ciphertext_sha256": os.urandom(32), "segment_size": 1 << 19,
    "created_at": ROW.created_at + timedelta(microseconds=1), "created_by": "other",
    "supersedes_version": 1,
}  # fmt: skip


@pytest.mark.parametrize("column", [f.name for f in dataclasses.fields(RowFields)])
def test_row_binding_changes_with_every_column(column: str) -> None:
    changed = dataclasses.replace(ROW, **{column: CHANGES[column]})
    assert row_binding(changed) != row_binding(ROW)


def test_row_binding_ignores_the_time_zone_of_the_same_instant() -> None:
    shifted = ROW.created_at.astimezone(datetime.now().astimezone().tzinfo)
    assert row_binding(dataclasses.replace(ROW, created_at=shifted)) == row_binding(ROW)
