"""Per-principal and per-application shares, and the summarised refusal events."""

from __future__ import annotations

import asyncio

import pytest

from service._gen.medvault.v1 import records_pb2 as pb
from service.authn import Principal
from service.limits import CallLimiter, Refusals, TooManyCallsError
from service.wire import Rejected, decode


def _user(name: str, app: str | None = None) -> Principal:
    return Principal(name, app, frozenset(), "ipv4:127.0.0.1:1")


def test_shares_refuse_only_the_caller_over_its_share() -> None:
    reports: list[Refusals] = []

    async def run() -> None:
        limiter = CallLimiter(2, 3, 0.05, reports.append)
        with limiter.slot(_user("a")), limiter.slot(_user("a")):
            for _ in range(3):
                with pytest.raises(TooManyCallsError), limiter.slot(_user("a")):
                    pass
            with limiter.slot(_user("b")):  # another principal is unaffected
                assert limiter.active("principal", "b") == 1
        assert limiter.active("principal", "a") == 0
        await asyncio.sleep(0.1)
        await limiter.flush()

    asyncio.run(run())
    assert len(reports) == 1
    assert reports[0].count == 3
    assert reports[0].resource == "principal/a"


def test_an_application_share_spans_its_users() -> None:
    reports: list[Refusals] = []

    async def run() -> None:
        limiter = CallLimiter(5, 2, 60, reports.append)
        with limiter.slot(_user("u1", "his")), limiter.slot(_user("u2", "his")):
            with pytest.raises(TooManyCallsError), limiter.slot(_user("u3", "his")):
                pass
            with limiter.slot(_user("u3", "lis")):
                pass
        await limiter.flush()  # an open window is written at shutdown

    asyncio.run(run())
    assert [(r.resource, r.count) for r in reports] == [("application/his", 1)]


_NESTED = pb.PutRecordRequest(
    header=pb.RecordHeader(patient=pb.PatientId(id="p", assigning_authority="a\x00"))
)


@pytest.mark.parametrize(
    ("cls", "data", "field"),
    [
        (pb.GetRecordRequest, pb.GetRecordRequest(id="ab\x00").SerializeToString(), "id"),
        (pb.PutRecordRequest, _NESTED.SerializeToString(), "header.patient.assigning_authority"),
        (pb.PutRecordRequest, _NESTED.SerializeToString().replace(b"a\x00", b"\xc3\x28"),
         "header.patient.assigning_authority"),
        (pb.GetRecordRequest, b"\x0a\xff\xff\xff\xff\x0f", "request"),
    ],
)
def test_decode_names_the_field(cls: type, data: bytes, field: str) -> None:
    result = decode(cls, data)
    assert isinstance(result, Rejected)
    assert result.error.field == field
