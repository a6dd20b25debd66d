"""Rewrap is resumable: stopped by the client, or the server killed mid-batch."""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from service._gen.medvault.v1 import keys_pb2 as kpb
from tests.integration.keys.helpers import (
    TIMEOUT,
    keys_stub,
    patient,
    read_digest,
    records_stub,
    rewrap_all,
    versions,
    write,
)

pytestmark = pytest.mark.integration
# 40 batches: enough that neither the cancel (after 4 batches) nor the kill (10 batches
# later) can find the rewrap finished even if the server runs 25 batches ahead of the
# client. Small batches keep the count of batches with fewer records: more records only
# lengthen the fill and the read-back.
BATCH = 4
RECORDS = 40 * BATCH
WRITERS = 8  # one principal: within its call share (server.max_calls_per_principal)


def _fill(server: Any) -> list[tuple[str, bytes]]:
    def batch(_: int) -> list[tuple[str, bytes]]:
        stub, who = records_stub(server), patient()
        return [write(stub, who, 256) for _ in range(RECORDS // WRITERS)]

    with ThreadPoolExecutor(WRITERS) as pool:
        return [w for chunk in pool.map(batch, range(WRITERS)) for w in chunk]


def _first(stream: Any, n: int) -> list[kpb.RewrapProgress]:
    """Read ``n`` progress messages, then drop the stream."""
    got = []
    for message in stream:
        got.append(message)
        if len(got) == n:
            break
    return got


def test_rewrap_resumes_after_cancel_and_kill(
    start_keys_server: Any, admin_cert: tuple[Path, Path]
) -> None:
    bucket = f"mv-kr-{secrets.token_hex(5)}"
    server = start_keys_server(bucket=bucket)
    written = _fill(server)
    admin = keys_stub(server, admin_cert)
    old = max(versions(admin))
    admin.RotateKek(kpb.RotateKekRequest(), timeout=TIMEOUT)

    stream = admin.Rewrap(kpb.RewrapRequest(batch_size=BATCH), timeout=600)
    seen = _first(stream, 5)
    stream.cancel()
    moved = versions(admin)[old].wrapped_keys
    assert seen[-1].rewrapped > 0
    assert 0 < moved < len(written)

    stream = admin.Rewrap(kpb.RewrapRequest(batch_size=BATCH), timeout=600)
    _first(stream, 10)
    server.process.kill()  # SIGKILL: no clean shutdown, a batch may be half done
    server.process.wait()
    with pytest.raises(grpc.RpcError):
        list(stream)

    server = start_keys_server(bucket=bucket)
    admin = keys_stub(server, admin_cert)
    left = versions(admin)[old].wrapped_keys
    assert 0 < left < moved
    last = rewrap_all(admin, batch=100)[-1]
    assert last.remaining == 0
    assert last.rewrapped == left
    assert versions(admin)[old].wrapped_keys == 0

    reader = records_stub(server)
    with ThreadPoolExecutor(8) as pool:
        digests = list(pool.map(lambda w: read_digest(reader, w[0]), written))
    assert digests == [digest for _, digest in written]
