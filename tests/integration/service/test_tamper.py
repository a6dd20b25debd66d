"""Tampering with stored ciphertext or key material ends a read with DATA_LOSS.

The tests alter what the shared server stored, behind its back: object bytes in its
S3 bucket (minio client) and rows in its database (SQLAlchemy). A segment is released
only after its tag verifies, so what arrives before DATA_LOSS is always an authentic
prefix that ends at a segment boundary before the tampered segment.

PYTEST_DONT_REWRITE: a failed assertion shows no values, since they could look like
patient data; the helpers in calls.py name what differs instead.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
import sqlalchemy as sa
from minio import Minio
from sqlalchemy.engine import Engine

from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from storage.sql_metadata import make_engine, records
from tests.fixtures.service import RunningService
from tests.integration.service.calls import (
    expect_error,
    expect_same_content,
    fetch,
    get,
    put,
    rpc_error,
    server_bucket,
)
from tests.integration.service.streams import FIRST_PLAIN, PLAIN, SEGMENT, data

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# Three segments: two full ones and about half a MiB in the last (about 2.5 MiB).
SIZE = FIRST_PLAIN + PLAIN + 500_000
LAST_START = FIRST_PLAIN + PLAIN  # plaintext offset of the last segment
HEADER = 40


@dataclass
class Backstage:
    """Direct access to what the shared server stored: its bucket and its database."""

    s3: Minio
    bucket: str
    engine: Engine

    def object_key(self, record_id: str) -> str:
        with self.engine.connect() as c:
            key: str = c.scalar(sa.select(records.c.object_key).where(records.c.id == record_id))
        return key

    def read(self, key: str) -> bytes:
        response = self.s3.get_object(self.bucket, key)
        try:
            return bytes(response.read())
        finally:
            response.close()
            response.release_conn()

    def write(self, key: str, blob: bytes) -> None:
        self.s3.put_object(self.bucket, key, io.BytesIO(blob), len(blob))

    def alter(self, record_id: str, change: Callable[[bytes], bytes]) -> None:
        key = self.object_key(record_id)
        self.write(key, change(self.read(key)))

    def swap_column(self, a: str, b: str, column: str) -> None:
        """Swap one column of two records' rows (via a temporary value: it may be unique)."""
        col = records.c[column]
        with self.engine.begin() as c:
            va = c.scalar(sa.select(col).where(records.c.id == a))
            vb = c.scalar(sa.select(col).where(records.c.id == b))
            temp = "swap-" + os.urandom(8).hex() if column == "object_key" else vb
            c.execute(records.update().where(records.c.id == a).values({column: temp}))
            c.execute(records.update().where(records.c.id == b).values({column: va}))
            c.execute(records.update().where(records.c.id == a).values({column: vb}))


@pytest.fixture(scope="module")
def backstage(
    medvault_service: RunningService, s3_server: object, database_url: str
) -> Iterator[Backstage]:
    engine = make_engine(database_url)
    yield Backstage(s3_server.client(),  # type: ignore[attr-defined]
                    server_bucket(medvault_service.config_path), engine)
    engine.dispose()


def _flip(position: int) -> Callable[[bytes], bytes]:
    def change(blob: bytes) -> bytes:
        at = position if position >= 0 else len(blob) + position
        return blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1 :]

    return change


def _drop_middle_segment(blob: bytes) -> bytes:
    return blob[:SEGMENT] + blob[2 * SEGMENT :]


# name: (change of the stored object, index of the first damaged segment); the plaintext
# before that segment may arrive before DATA_LOSS, and nothing after.
CASES: dict[str, tuple[Callable[[bytes], bytes], int]] = {
    "header-length-byte": (_flip(0), 0),
    "header-salt": (_flip(7), 0),
    "header-nonce-prefix": (_flip(HEADER - 1), 0),
    "first-segment": (_flip(HEADER + 1000), 0),
    "first-segment-tag": (_flip(SEGMENT - 1), 0),
    "middle-segment": (_flip(SEGMENT + 77), 1),
    "last-segment": (_flip(2 * SEGMENT + 100), 2),
    "last-segment-tag": (_flip(-1), 2),
    "truncated-1-byte": (lambda b: b[:-1], 2),
    "truncated-last-segment": (lambda b: b[: 2 * SEGMENT], 1),
    "middle-segment-removed": (_drop_middle_segment, 1),
    "extended-1-byte": (lambda b: b + b"\0", 2),
    "extended-1-segment": (lambda b: b + os.urandom(SEGMENT), 2),
    "empty-object": (lambda b: b"", 0),
}
SEGMENT_STARTS = [0, FIRST_PLAIN, LAST_START]  # plaintext offsets of the three segments


@pytest.mark.parametrize("case", list(CASES))
def test_tampered_object_is_data_loss(
    stub: pb_grpc.RecordServiceStub, patient: pb.PatientId, backstage: Backstage, case: str
) -> None:
    change, damaged = CASES[case]
    content = data(SIZE, seed=11)
    record = put(stub, patient, content)
    backstage.alter(record.id, change)

    fetched = fetch(stub, record.id)
    expect_error(fetched.error, grpc.StatusCode.DATA_LOSS)
    # Every authenticated segment before the damage was released, and nothing else.
    expect_same_content(fetched.content, content[: SEGMENT_STARTS[damaged]])

    # A range into the damaged segment fails too and never returns its bytes.
    offset = max(SEGMENT_STARTS[damaged] - 10, 0)
    ranged = fetch(stub, record.id, offset=offset, length=20)
    expect_error(ranged.error, grpc.StatusCode.DATA_LOSS)
    assert offset + len(ranged.content) <= SEGMENT_STARTS[damaged], "damaged bytes released"
    expect_same_content(ranged.content, content[offset : offset + len(ranged.content)])
    # The metadata row itself is intact.
    assert stub.StatRecord(pb.StatRecordRequest(id=record.id), timeout=30).size == SIZE


def test_range_reads_verify_only_the_segments_they_need(
    stub: pb_grpc.RecordServiceStub, patient: pb.PatientId, backstage: Backstage
) -> None:
    content = data(SIZE, seed=12)
    record = put(stub, patient, content)
    backstage.alter(record.id, _flip(SEGMENT + 500))  # the middle segment

    expect_same_content(get(stub, record.id, offset=10, length=100)[1], content[10:110])
    expect_same_content(get(stub, record.id, offset=LAST_START + 5, length=0)[1],
                        content[LAST_START + 5 :])
    for offset, length in [(FIRST_PLAIN, 1), (FIRST_PLAIN + 400, 10), (0, 0),
                           (FIRST_PLAIN - 5, 10), (FIRST_PLAIN - 5, PLAIN + 10)]:
        fetched = fetch(stub, record.id, offset=offset, length=length)
        expect_error(fetched.error, grpc.StatusCode.DATA_LOSS)
        authentic_end = max(FIRST_PLAIN - offset, 0)  # only segment 0 may be released
        assert len(fetched.content) <= authentic_end, "bytes of a damaged segment released"
        expect_same_content(fetched.content, content[offset : offset + len(fetched.content)])


@pytest.fixture
def two_records(
    stub: pb_grpc.RecordServiceStub, patient: pb.PatientId
) -> tuple[pb.Record, pb.Record]:
    """Two records of the same patient and size, so sizes cannot tell them apart."""
    return put(stub, patient, data(SIZE, seed=21)), put(stub, patient, data(SIZE, seed=22))


def test_swapped_object_keys_are_data_loss(
    stub: pb_grpc.RecordServiceStub, backstage: Backstage, two_records: tuple[pb.Record, ...]
) -> None:
    a, b = two_records
    backstage.swap_column(a.id, b.id, "object_key")
    for record in (a, b):
        fetched = fetch(stub, record.id)
        expect_error(fetched.error, grpc.StatusCode.DATA_LOSS)
        assert fetched.content == b"", "content of another record was released"
        ranged = fetch(stub, record.id, offset=LAST_START, length=10)
        expect_error(ranged.error, grpc.StatusCode.DATA_LOSS)
        assert ranged.content == b"", "content of another record was released"


def test_swapped_object_contents_are_data_loss(
    stub: pb_grpc.RecordServiceStub, backstage: Backstage, two_records: tuple[pb.Record, ...]
) -> None:
    a, b = two_records
    key_a, key_b = backstage.object_key(a.id), backstage.object_key(b.id)
    blob_a, blob_b = backstage.read(key_a), backstage.read(key_b)
    assert len(blob_a) == len(blob_b), "records of one size have different stored sizes"
    backstage.write(key_a, blob_b)
    backstage.write(key_b, blob_a)
    for record in (a, b):
        fetched = fetch(stub, record.id)
        expect_error(fetched.error, grpc.StatusCode.DATA_LOSS)
        assert fetched.content == b"", "content of another record was released"
        ranged = fetch(stub, record.id, offset=5, length=10)
        expect_error(ranged.error, grpc.StatusCode.DATA_LOSS)
        assert ranged.content == b"", "content of another record was released"


def test_swapped_wrapped_keys_are_data_loss(
    stub: pb_grpc.RecordServiceStub, backstage: Backstage, two_records: tuple[pb.Record, ...]
) -> None:
    a, b = two_records
    backstage.swap_column(a.id, b.id, "wrapped_dek")
    for record in (a, b):
        fetched = fetch(stub, record.id)
        expect_error(fetched.error, grpc.StatusCode.DATA_LOSS)
        assert fetched.metadata is None, "metadata released with a key that does not verify"
        assert fetched.content == b"", "content released with a key that does not verify"
        error = rpc_error(stub.StatRecord, pb.StatRecordRequest(id=record.id), timeout=30)
        expect_error(error, grpc.StatusCode.DATA_LOSS)
        error = rpc_error(stub.StatRecord, pb.StatRecordRequest(id=record.id, version=1),
                          timeout=30)
        expect_error(error, grpc.StatusCode.DATA_LOSS)
