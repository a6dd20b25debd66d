"""Health of each dependency in the standard gRPC health service.

Besides the overall status (``""``) and each medvault service, the health service
answers for ``medvault.dependency.database``, ``medvault.dependency.object_store`` and
``medvault.dependency.token``: each is probed every ``server.health_probe_seconds`` with
the cheapest real operation (``SELECT 1``; a listing of an empty prefix of the bucket;
a random number from the token) and is ``SERVING`` while its last probe succeeded within
``PROBE_TIMEOUT`` seconds, else ``NOT_SERVING``. Any standard client reads them, e.g.
``grpc_health_probe -service medvault.dependency.token``. A status change is logged
once (the error's type only: a message may name a host or path, never patient data).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from storage import CallDeadline, bounded

log = logging.getLogger(__name__)

PREFIX = "medvault.dependency."
PROBE_TIMEOUT = 5.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True, slots=True)
class Probe:
    """One dependency's name (after ``PREFIX``) and a blocking check that raises if down."""

    name: str
    check: Callable[[], object]


def _bounded_check(probe: Probe) -> None:
    with bounded(CallDeadline.within(PROBE_TIMEOUT)):
        probe.check()


async def _probe_once(probe: Probe) -> tuple[bool, str]:
    try:
        # Bounded in the worker too: a probe of a stalled store gives its thread back.
        await asyncio.wait_for(asyncio.to_thread(_bounded_check, probe), PROBE_TIMEOUT)
    except Exception as e:  # noqa: BLE001  (any failure means not serving)
        return False, type(e).__name__
    return True, ""


async def probe_forever(
    servicer: health_aio.HealthServicer, probes: list[Probe], interval: float
) -> None:
    """Probe every dependency now and then every ``interval`` seconds, until cancelled."""
    last: dict[str, bool] = {}
    while True:
        results = await asyncio.gather(*(_probe_once(p) for p in probes))
        for probe, (ok, error) in zip(probes, results, strict=True):
            await servicer.set(PREFIX + probe.name, SERVING if ok else NOT_SERVING)
            if last.get(probe.name) != ok:
                if ok:
                    log.info("dependency serving", extra={"dependency": probe.name})
                else:
                    log.warning(
                        "dependency not serving",
                        extra={"dependency": probe.name, "error": error},
                    )
                last[probe.name] = ok
        await asyncio.sleep(interval)
