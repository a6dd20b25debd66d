"""KEK rotation, rewrap and retirement against a real server, under load.

The issue's acceptance test: 8 clients write and read (a counted load, so a slow host
tries as much) while the KEK rotates and every wrapped key moves to the new version;
zero failed reads, zero wrong bytes, and afterwards no key left on the retired version.
Its key stays on the token (backups still need it) until it is retired again with
destroy_key.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from service._gen.medvault.v1 import keys_pb2 as kpb
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from service.cli.kek_cmd import register_kek
from tests.fixtures.service import RunningService
from tests.fixtures.softhsm import SoftHsmToken
from tests.integration.keys.helpers import (
    TIMEOUT,
    keys_stub,
    patient,
    read_digest,
    records_stub,
    rewrap_all,
    token_kek_versions,
    versions,
    write,
)
from tests.integration.service.calls import fetch, rpc_error

pytestmark = pytest.mark.integration
CLIENTS = 8
# Load is counted, not timed (a slow host makes fewer calls a second): the KEK rotates
# once the clients have written BEFORE records, the rewrap runs under load, and the load
# goes on until the clients have read READS records in all, and at least AFTER seconds
# on the new KEK; CAP_SECONDS bounds a host too slow for that.
BEFORE = 40
READS = 150
AFTER = 2.0
CAP_SECONDS = 90.0


@dataclass
class Tally:
    """What one client did and saw."""

    written: list[tuple[str, bytes]] = field(default_factory=list)
    reads: int = 0
    failed_reads: list[str] = field(default_factory=list)
    wrong_bytes: int = 0
    failed_writes: list[str] = field(default_factory=list)


def _client(stub: pb_grpc.RecordServiceStub, stop: threading.Event, tally: Tally) -> None:
    who = patient()
    rng = random.Random()
    while not stop.is_set():
        try:
            tally.written.append(write(stub, who, rng.randint(1, 48 << 10)))
        except grpc.RpcError as e:
            tally.failed_writes.append(e.code().name)
        if not tally.written:
            continue
        record_id, digest = rng.choice(tally.written)
        got = read_digest(stub, record_id)
        if isinstance(got, grpc.StatusCode):
            tally.failed_reads.append(got.name)
        elif got != digest:
            tally.wrong_bytes += 1
        else:
            tally.reads += 1


def _load(server: RunningService, admin: Any) -> tuple[list[Tally], list[kpb.RewrapProgress]]:
    """Run the clients; rotate after BEFORE writes and rewrap while they run, then go on
    until READS reads and AFTER seconds (at most CAP_SECONDS in all)."""
    tallies = [Tally() for _ in range(CLIENTS)]
    stop = threading.Event()
    threads = [
        threading.Thread(target=_client, args=(records_stub(server), stop, t), daemon=True)
        for t in tallies
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()

    def until(done: Any) -> None:
        while not done() and time.monotonic() - started < CAP_SECONDS:
            time.sleep(0.05)

    until(lambda: sum(len(t.written) for t in tallies) >= BEFORE)
    admin.RotateKek(kpb.RotateKekRequest(), timeout=TIMEOUT)
    progress = rewrap_all(admin, batch=50)
    rewrapped = time.monotonic()
    until(lambda: sum(t.reads for t in tallies) >= READS
          and time.monotonic() - rewrapped >= AFTER)  # fmt: skip
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    return tallies, progress


@pytest.fixture(scope="module")
def server(start_keys_server: Any) -> RunningService:
    service: RunningService = start_keys_server()
    return service


def test_rotate_rewrap_retire_under_load(
    server: RunningService,
    admin_cert: tuple[Path, Path],
    keys_token: str,
    softhsm_token: SoftHsmToken,
) -> None:
    admin = keys_stub(server, admin_cert)
    old = max(versions(admin))
    seed = records_stub(server)
    preexisting = [write(seed, patient(), 4096) for _ in range(50)]  # all on the old KEK

    began = time.monotonic()
    tallies, progress = _load(server, admin)
    new = progress[-1].target_version
    assert new == old + 1
    assert progress[-1].remaining == 0 or progress[-1].rewrapped > 0
    # Keys written by puts in flight at the rotation: one more pass moves them.
    final = rewrap_all(admin)[-1]
    assert final.remaining == 0

    reads = sum(t.reads for t in tallies)
    writes = sum(len(t.written) for t in tallies)
    print(
        f"\n{CLIENTS} clients, {time.monotonic() - began:.0f} s: {writes} writes, "
        f"{reads} verified reads, rewrap moved {progress[-1].rewrapped} + {final.rewrapped} keys"
    )
    assert [r for t in tallies for r in t.failed_reads] == []
    assert sum(t.wrong_bytes for t in tallies) == 0
    assert [w for t in tallies for w in t.failed_writes] == []
    assert reads > 100
    assert writes > 100

    listed = versions(admin)
    assert listed[old].wrapped_keys == 0
    assert listed[new].state == "active"
    assert listed[new].wrapped_keys == writes + len(preexisting)

    retired = admin.RetireKek(kpb.RetireKekRequest(version=old), timeout=TIMEOUT)
    assert retired.state == "retired"
    assert retired.wrapped_keys == 0
    assert old in token_kek_versions(softhsm_token, keys_token)  # kept for restores
    destroyed = admin.RetireKek(
        kpb.RetireKekRequest(version=old, destroy_key=True), timeout=TIMEOUT
    )
    assert destroyed.state == "retired"
    assert old not in token_kek_versions(softhsm_token, keys_token)
    assert new in token_kek_versions(softhsm_token, keys_token)
    everything = [*preexisting, *(w for t in tallies for w in t.written)]
    for record_id, digest in everything:
        assert read_digest(seed, record_id) == digest


def test_retire_refused_while_used_or_active(
    server: RunningService, admin_cert: tuple[Path, Path]
) -> None:
    admin = keys_stub(server, admin_cert)
    write(records_stub(server), patient(), 100)
    in_use = max(versions(admin))
    admin.RotateKek(kpb.RotateKekRequest(), timeout=TIMEOUT)
    active = max(versions(admin))

    error = rpc_error(admin.RetireKek, kpb.RetireKekRequest(version=in_use), timeout=TIMEOUT)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "still use" in error.details()
    error = rpc_error(admin.RetireKek, kpb.RetireKekRequest(version=active), timeout=TIMEOUT)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "active" in error.details()
    error = rpc_error(admin.RetireKek, kpb.RetireKekRequest(version=0), timeout=TIMEOUT)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert versions(admin)[in_use].state == "previous"


def test_non_admin_cannot_manage_keys(server: RunningService) -> None:
    stub = keys_stub(server, (server.tls.client_cert, server.tls.client_key))
    error = rpc_error(stub.RotateKek, kpb.RotateKekRequest(), timeout=TIMEOUT)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


def test_key_missing_from_token_is_failed_precondition(
    server: RunningService, keys_database: str
) -> None:
    """A row whose KEK version is not on the token: a clear error naming the key label."""
    stub = records_stub(server)
    record_id, _ = write(stub, patient(), 100)
    engine = sa.create_engine(keys_database)
    try:
        with engine.begin() as connection:
            connection.execute(
                sa.text("UPDATE records SET kek_version = 77 WHERE id = :id"), {"id": record_id}
            )
    finally:
        engine.dispose()
    fetched = fetch(stub, record_id)
    assert fetched.error is not None
    assert fetched.error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "medvault-kek-v77" in (fetched.error.details() or "")


def _cli(server: RunningService, cert: tuple[Path, Path], *args: str) -> int:
    top = argparse.ArgumentParser(prog="medvault")
    keys = top.add_subparsers(dest="command", required=True).add_parser("keys")
    register_kek(keys.add_subparsers(dest="keys_command", required=True))
    tls = ["--endpoint", server.endpoint, "--ca", str(server.tls.ca),
           "--cert", str(cert[0]), "--key", str(cert[1])]  # fmt: skip
    ns = top.parse_args(["keys", *args, *tls])
    return int(ns.func(ns))


def test_cli_rotate_rewrap_list_retire(
    server: RunningService,
    admin_cert: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    keys_token: str,
    softhsm_token: SoftHsmToken,
) -> None:
    write(records_stub(server), patient(), 100)
    before = max(versions(keys_stub(server, admin_cert)))
    assert _cli(server, admin_cert, "rotate-kek") == 0
    assert f"created KEK version {before + 1}" in capsys.readouterr().out
    assert _cli(server, admin_cert, "retire-kek", f"v{before}") == 1
    assert "still use" in capsys.readouterr().err
    assert _cli(server, admin_cert, "rewrap", "--batch", "7", "--quiet") == 0
    assert "0 left on older versions" in capsys.readouterr().out
    assert _cli(server, admin_cert, "retire-kek", str(before)) == 0
    assert "stays on the token" in capsys.readouterr().out
    assert before in token_kek_versions(softhsm_token, keys_token)
    assert _cli(server, admin_cert, "retire-kek", str(before), "--destroy-key") == 0
    assert "deleted from the token" in capsys.readouterr().out
    assert before not in token_kek_versions(softhsm_token, keys_token)
    assert _cli(server, admin_cert, "keks") == 0
    table = capsys.readouterr().out
    assert f"v{before + 1}" in table
    assert "active" in table
    assert "retired" in table
