"""StatsService: de-identified aggregate counts for SDMX-HD reporting (docs/statistics.md).

The counts are suppressed below the threshold before they reach this module
(``storage.stats``); the reply carries counts and codes only. Each export is one audit
event (action ``stats.export``, resource ``stats/records/<period>``), committed before
the counts leave.
"""

from __future__ import annotations

import asyncio
import re

from grpc import aio

from service._gen.medvault.v1 import stats_pb2 as spb
from service._gen.medvault.v1 import stats_pb2_grpc as spb_grpc
from service.calls import CallState, entered, handled
from service.guard import AccessGuard
from storage import MonthlyCounts, RecordStatistics

_PERIOD = re.compile(r"[0-9]{4}-[0-9]{2}")


def resource(period: str) -> str:
    """The audit resource of an export of ``period`` (a placeholder for junk input)."""
    return f"stats/records/{period if _PERIOD.fullmatch(period) else '(invalid period)'}"


def counts_to_pb(counts: MonthlyCounts) -> spb.CountRecordsResponse:
    """The reply: a suppressed cell carries 0 and ``suppressed``, never its count."""
    return spb.CountRecordsResponse(
        period=counts.period, facility=counts.facility, time_zone=counts.time_zone,
        min_cell=counts.min_cell,
        counts=[
            spb.RecordCount(
                kind=f"RECORD_KIND_{cell.kind.value}",  # the enum value's name
                records=cell.count or 0, suppressed=cell.suppressed,
            )
            for cell in counts.cells
        ],
    )  # fmt: skip


class StatsServicer(spb_grpc.StatsServiceServicer):  # type: ignore[misc]  # untyped stub
    """medvault.v1.StatsService."""

    def __init__(self, stats: RecordStatistics, guard: AccessGuard) -> None:
        self._stats = stats
        self._guard = guard

    def _count(self, state: CallState, period: str) -> MonthlyCounts:
        call = entered(state)
        counts = self._stats.monthly(period)  # a bad period fails here, audited as such
        # Committed before the reply leaves: an export that cannot be audited fails.
        self._guard.audit(call, state.resource, outcome="allowed")
        return counts

    async def CountRecords(  # noqa: N802  (gRPC method names)
        self, request: spb.CountRecordsRequest, context: aio.ServicerContext
    ) -> spb.CountRecordsResponse:
        """New records of the month by kind, for this facility; small cells withheld."""
        async with handled(self._guard, context, "CountRecords") as state:
            state.resource = resource(request.period)
            counts = await asyncio.to_thread(self._count, state, request.period)
            return counts_to_pb(counts)
        raise AssertionError("unreachable")  # pragma: no cover
