"""Issue 12 item 3: ``server.processes = 2`` serves one port from two worker processes.

One supervisor, two workers (SO_REUSEPORT) on one database (SQLite file or PostgreSQL),
bucket and token. Clients on separate connections write and read concurrently; the
call-id trailer (``w<index>-...``) shows which worker served each call, so the test
knows both did. Then a worker is SIGKILLed: the supervisor starts another, and calls
on new connections keep succeeding. Afterwards every acknowledged record reads back
byte-identical, the audit chain (written by three processes) verifies, the summed
metrics count every acknowledged put, and stopping the supervisor (SIGTERM) or killing it
(SIGKILL) stops its workers.
SIGHUP to the supervisor makes every worker re-read its policy (and CRL), also a
worker that is starting when it comes (a revoked certificate is refused by every worker).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import signal
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from service._gen.medvault.v1 import access_pb2 as apb
from service._gen.medvault.v1 import access_pb2_grpc as apb_grpc
from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from service.localstack.ca import DevCA
from service.metrics import CALL_TRAILER
from tests.fixtures.databases import new_database
from tests.fixtures.service import RunningService, TlsFiles, free_port
from tests.integration.access.helpers import client, issue_client, verify, wait_for
from tests.integration.service.streams import new_patient

pytestmark = pytest.mark.integration
TIMEOUT = 30
CLIENTS = 4
PUTS_PER_CLIENT = 4


@pytest.fixture
def own_database(
    request: pytest.FixtureRequest, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    yield from new_database(request, database_url, tmp_path_factory)


def _log(service: RunningService, message: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``service`` (supervisor and workers) with ``msg`` ``message``."""
    found = []
    for line in service.log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") == message:
            found.append(entry)
    return found


def _serving_workers(service: RunningService) -> dict[int, int]:
    """Worker index -> pid of the latest process that reported serving."""
    return {entry["worker"]: entry["pid"] for entry in _log(service, "worker serving")}


def _worker(call: Any) -> int:
    """The worker index in a finished call's id trailer (``w<index>-<hex>``)."""
    value = dict(call.trailing_metadata() or ())[CALL_TRAILER]
    return int(value.split("-", 1)[0].removeprefix("w"))


def _put(stub: pb_grpc.RecordServiceStub, content: bytes) -> tuple[pb.Record, int]:
    head = pb.RecordHeader(
        patient=new_patient(), kind=pb.RECORD_KIND_OTHER, content_type="application/octet-stream"
    )
    messages = iter([pb.PutRecordRequest(header=head), pb.PutRecordRequest(chunk=content)])
    record, call = stub.PutRecord.with_call(messages, timeout=TIMEOUT)
    return record, _worker(call)


def _get(stub: pb_grpc.RecordServiceStub, record_id: str) -> tuple[bytes, int]:
    call = stub.GetRecord(pb.GetRecordRequest(id=record_id), timeout=TIMEOUT)
    content = b"".join(r.chunk for r in call if r.WhichOneof("message") == "chunk")
    return content, _worker(call)


def _client_round(service: RunningService, shared: dict[str, bytes]) -> set[int]:
    """One client on its own connection: puts, then reads of its own and others' records."""
    served: set[int] = set()
    with service.channel() as channel:
        stub = pb_grpc.RecordServiceStub(channel)
        mine = []
        for _ in range(PUTS_PER_CLIENT):
            content = secrets.token_bytes(secrets.randbelow(40_000) + 1)
            record, worker = _put(stub, content)
            shared[record.id] = content  # acknowledged: must read back identical
            mine.append(record.id)
            served.add(worker)
        for record_id in [*mine, *list(shared)[:PUTS_PER_CLIENT]]:
            content, worker = _get(stub, record_id)
            assert content == shared[record_id], "a record read back different"
            served.add(worker)
    return served


def _until_both_served(service: RunningService, served: set[int], shared: dict[str, bytes]) -> None:
    """New connections until both workers served one (the kernel hashes connections)."""
    for _ in range(64):
        if served >= {0, 1}:
            return
        with service.channel() as channel:
            record, worker = _put(pb_grpc.RecordServiceStub(channel), b"synthetic probe")
            shared[record.id] = b"synthetic probe"
            served.add(worker)
    raise AssertionError(f"64 connections all reached worker(s) {sorted(served)}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _metric_total(port: int, name: str, method: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and f'method="{method}"' in line and 'code="OK"' in line
    )


STALE = "CRL is past its nextUpdate; publish a fresh one"


def _stale_crl_tls(tls_files: TlsFiles, directory: Path) -> dict[str, Any]:
    """A ``[tls]`` section with an empty CRL past its nextUpdate: each load of it logs a
    warning, which shows when a worker has read it."""
    crl = DevCA.load_or_create(tls_files.ca.parent).issue_crl(
        directory / "clients.crl", [], validity=dt.timedelta(minutes=-1)
    )
    return {"enabled": True, "cert": tls_files.server_cert, "key": tls_files.server_key,
            "client_ca": tls_files.ca, "crl": crl}  # fmt: skip


def _revoke_while_restarting(
    service: RunningService, tls: dict[str, Any], pid: int, victim: tuple[Path, Path]
) -> int:
    """SIGKILL worker 1 (``pid``); once its successor has read the CRL, and while it still
    starts (SIGSTOPped there), revoke ``victim`` and SIGHUP the supervisor. Its new pid.

    A worker ignored SIGHUP until it installed its reload handler, so the reload was lost
    and the restarted worker served the revoked certificate until the next SIGHUP.
    """

    def crl_loads() -> int:
        return sum(1 for e in _log(service, STALE) if e.get("worker") == 1)

    loads = crl_loads()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while crl_loads() == loads:  # polled closely: its start goes on for a few tenths
        assert time.monotonic() < deadline, "worker 1 was not restarted"
        time.sleep(0.01)
    new = [e["pid"] for e in _log(service, "worker started") if e["worker"] == 1][-1]
    os.kill(new, signal.SIGSTOP)
    try:
        reloads = len(_log(service, "CRL reloaded"))
        serial = x509.load_pem_x509_certificate(victim[0].read_bytes()).serial_number
        DevCA.load_or_create(service.tls.ca.parent).issue_crl(Path(tls["crl"]), [serial])
        os.kill(service.process.pid, signal.SIGHUP)  # forwarded to both workers
        wait_for(lambda: len(_log(service, "CRL reloaded")) > reloads, 30, "worker 0 reloading")
    finally:
        os.kill(new, signal.SIGCONT)
    return new


def _whoami_on_new_connection(service: RunningService, cert: Path, key: Path) -> tuple[Any, int]:
    """WhoAmI as ``cert`` on a connection of its own: (status code, worker that served)."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=service.tls.ca.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
    options = [("grpc.use_local_subchannel_pool", 1)]  # a new TCP connection every time
    with grpc.secure_channel(service.endpoint, creds, options=options) as channel:
        stub = apb_grpc.AccessServiceStub(channel)
        try:
            _, call = stub.WhoAmI.with_call(apb.WhoAmIRequest(), timeout=TIMEOUT)
        except grpc.RpcError as e:
            return e.code(), _worker(e)
        return grpc.StatusCode.OK, _worker(call)


def _refused_by_both_workers(service: RunningService, victim: tuple[Path, Path]) -> None:
    served: dict[int, Any] = {}
    for _ in range(64):
        code, worker = _whoami_on_new_connection(service, *victim)
        served[worker] = code
        if len(served) == 2:
            break
    assert set(served) == {0, 1}, f"64 connections all reached worker(s) {sorted(served)}"
    refused = grpc.StatusCode.UNAUTHENTICATED
    assert served == {0: refused, 1: refused}, f"a revoked certificate is served: {served}"


def _metric_lines(port: int, name: str) -> list[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return [line for line in text.splitlines() if line.split("{")[0].split(" ")[0] == name]


def test_two_worker_processes_share_one_port_safely(
    service_factory: Any, own_database: str, tls_files: TlsFiles, tmp_path: Path
) -> None:
    metrics_port = free_port()
    tls = _stale_crl_tls(tls_files, tmp_path)
    victim = issue_client(tls_files, tmp_path, "proc-crl-victim", "security_officer")
    service: RunningService = service_factory(
        own_database, processes=2, metrics_listen=f"127.0.0.1:{metrics_port}",
        extra_sections={"tls": tls},
    )  # fmt: skip
    wait_for(lambda: bool(_log(service, "supervisor serving")), 60, "both workers serving")
    pids = _serving_workers(service)
    assert set(pids) == {0, 1}
    assert service.process.pid not in pids.values()

    # SIGHUP (policy and CRL reload: one handler in each process) reaches every worker.
    os.kill(service.process.pid, signal.SIGHUP)
    wait_for(lambda: {e.get("worker") for e in _log(service, "policy reloaded")} == {0, 1}, 30,
             "both workers reloading the policy")  # fmt: skip

    shared: dict[str, bytes] = {}
    with ThreadPoolExecutor(CLIENTS) as pool:
        rounds = list(pool.map(lambda _: _client_round(service, shared), range(CLIENTS)))
    served = set().union(*rounds)
    _until_both_served(service, served, shared)

    # A worker SIGKILLed: the supervisor starts another in its slot; new connections
    # (the killed worker's are gone) are served meanwhile by the survivor, then by both.
    # A certificate revoked (SIGHUP) while the new one starts is refused by it too.
    new = _revoke_while_restarting(service, tls, pids[1], victim)
    wait_for(lambda: _serving_workers(service).get(1) == new, 60, "worker 1 restarted")
    _refused_by_both_workers(service, victim)
    assert _serving_workers(service)[0] == pids[0], "the other worker was restarted too"
    after: set[int] = set()
    with ThreadPoolExecutor(CLIENTS) as pool:
        after = set().union(*pool.map(lambda _: _client_round(service, shared), range(CLIENTS)))
    _until_both_served(service, after, shared)

    with service.channel() as channel:  # every acknowledged put, byte-identical
        stub = pb_grpc.RecordServiceStub(channel)
        for record_id, content in shared.items():
            assert _get(stub, record_id)[0] == content
    officer = client(service, issue_client(tls_files, tmp_path, "proc-officer", "security_officer"))
    try:
        chain = verify(officer)
    finally:
        officer.close()
    assert chain.ok, f"audit chain: {chain.reason} at {chain.first_bad_sequence}"
    assert chain.events_checked >= 2 * len(shared)  # a write and at least one read each
    # The supervisor's metrics sum the workers', the killed one's included.
    puts = _metric_total(metrics_port, "medvault_rpc_calls_total", "RecordService/PutRecord")
    assert puts >= len(shared)
    # A gauge is the live workers' sum: the killed one's last value does not stay in it.
    jobs = _metric_lines(metrics_port, "medvault_worker_jobs")
    assert len(jobs) == 1, f"medvault_worker_jobs is not one series: {jobs}"
    # The run-ledger gauges: the supervisor authenticates the rows in a token session of its own.
    assert _metric_lines(metrics_port, "medvault_run_ledger_up") == ["medvault_run_ledger_up 1.0"]

    # Each backend ends the supervisor one of the two ways: asked (SIGTERM, forwarded;
    # it waits for its workers), or killed (SIGKILL: the workers' parent-death signal).
    workers = list(_serving_workers(service).values())
    if own_database.startswith("sqlite"):
        os.kill(service.process.pid, signal.SIGKILL)
        service.process.wait()
        wait_for(lambda: not any(_alive(pid) for pid in workers), 30, "the workers to stop")
    else:
        service.stop()
        assert service.process.returncode == 0
        assert not [pid for pid in workers if _alive(pid)], "a worker outlived its supervisor"
    print(
        json.dumps(
            {
                "acknowledged": len(shared),
                "events": chain.events_checked,
                "workers_before_kill": sorted(served),
                "after": sorted(after),
            }
        )
    )
