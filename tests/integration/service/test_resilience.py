"""Large records in bounded memory, and failures: S3 outage, crash before commit, bad keys.

PYTEST_DONT_REWRITE: a failed assertion shows no values, since they could look like
patient data; the helpers in calls.py name what differs instead.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
import sqlalchemy as sa

from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from storage.audit_log import audit_events
from storage.sql_metadata import make_engine, records, upgrade
from tests.fixtures.seaweed import S3Server
from tests.fixtures.service import ROOT, RunningService
from tests.fixtures.softhsm import WRONG_PIN_TOKEN_LABEL, SoftHsmToken
from tests.integration.service.calls import (
    expect_error,
    expect_same_content,
    get,
    header,
    list_all,
    put,
    requests,
    rpc_error,
    server_bucket,
)
from tests.integration.service.streams import data, new_patient, stream, stream_sha256

pytestmark = pytest.mark.integration

MIB = 1 << 20
Factory = Callable[..., RunningService]


def _sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'metadata.db'}"


class PeakRss:
    """Samples a process's resident set size in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self._process = psutil.Process(pid)
        self._interval = interval
        self._stop = threading.Event()
        self.baseline = self._process.memory_info().rss
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.baseline) / MIB


@pytest.mark.timeout(300)
def test_200_mib_record_in_bounded_server_memory(
    service_factory: Factory, tmp_path: Path
) -> None:
    # SQLite only: the content path (gRPC, envelope, S3) is the same code for both
    # backends, and a second 200 MiB round trip would double the suite's longest test.
    url = _sqlite_url(tmp_path)
    size, seed = 200 * MIB, 2024
    expected = stream_sha256(size, seed)
    patient = new_patient()
    service = service_factory(url)
    with service.channel() as channel:
        stub = pb_grpc.RecordServiceStub(channel)
        # Warm up: the first put and get load code and fill pools that stay loaded; that
        # is start-up cost, not growth with the record size.
        warm = put(stub, patient, data(3 * MIB))
        get(stub, warm.id)
        with PeakRss(service.process.pid) as put_rss:
            record = stub.PutRecord(requests(header(patient), stream(size, seed)), timeout=240)
    assert record.size == size, record.size
    assert record.sha256 == expected, "server digest differs"

    # The get runs in a fresh server on the same bucket and database: the allocator
    # keeps what the put freed, which would hide the get's own growth.
    service.stop()
    service = service_factory(url, bucket=server_bucket(service.config_path))
    digest = hashlib.sha256()
    received = 0
    with service.channel() as channel:
        stub = pb_grpc.RecordServiceStub(channel)
        get(stub, warm.id)
        with PeakRss(service.process.pid) as get_rss:
            for response in stub.GetRecord(pb.GetRecordRequest(id=record.id), timeout=240):
                if response.WhichOneof("message") == "chunk":
                    digest.update(response.chunk)
                    received += len(response.chunk)
    assert received == size, received
    assert digest.digest() == expected, "content read back differs"
    growth = {"put": put_rss.growth_mib, "get": get_rss.growth_mib}
    report = ", ".join(f"{rpc} {mib:.0f} MiB" for rpc, mib in growth.items())
    assert max(growth.values()) < 100, f"server RSS grew beyond 100 MiB: {report}"


def _object_keys(s3: S3Server, bucket: str) -> list[str]:
    return [str(o.object_name) for o in s3.client().list_objects(bucket, recursive=True)]


@pytest.mark.timeout(240)
def test_s3_outage_mid_upload(
    service_factory: Factory, own_s3: S3Server, database_url: str
) -> None:
    service = service_factory(database_url, s3=own_s3)
    bucket = server_bucket(service.config_path)
    patient = new_patient()
    stopping_at: list[float] = []
    stopped = threading.Event()

    def content() -> Iterator[bytes]:
        for sent, chunk in enumerate(stream(64 * MIB, seed=64)):
            if sent == 20:  # about 20 MiB yielded: the object store goes away
                stopping_at.append(time.monotonic())
                own_s3.server.stop(timeout=2)
                stopped.set()
            yield chunk

    with service.channel() as channel:
        stub = pb_grpc.RecordServiceStub(channel)
        error = rpc_error(stub.PutRecord, requests(header(patient), content()), timeout=120)
        failed_at = time.monotonic()
        expect_error(error, grpc.StatusCode.UNAVAILABLE)
        assert stopping_at, "the put failed before the object store was stopped"
        took = failed_at - stopping_at[0]
        assert took < 60, f"took {took:.0f} s to fail"
        # The call may end while the request thread still waits for weed to exit.
        assert stopped.wait(30), "the object store did not stop"
        assert service.process.poll() is None, "the server died"
        assert not list_all(stub, patient, all_versions=True), "a failed put is listed"

        own_s3.server.start()
        assert _object_keys(own_s3, bucket) == [], "an object is left from the failed put"

        content_ok = data(6 * MIB, seed=65)
        record = put(stub, patient, content_ok)
        expect_same_content(get(stub, record.id)[1], content_ok)
        assert len(list_all(stub, patient, all_versions=True)) == 1, "not exactly one record"
    assert len(_object_keys(own_s3, bucket)) == 1, "not exactly one object"


@pytest.mark.timeout(180)
def test_crash_between_upload_and_commit(
    service_factory: Factory, database_url: str, s3_server: S3Server,
    softhsm_token: SoftHsmToken,
) -> None:
    crashing = service_factory(database_url, env={"MEDVAULT_FAULT": "crash-before-commit"})
    bucket = server_bucket(crashing.config_path)
    patient = new_patient()
    with crashing.channel() as channel:
        error = rpc_error(pb_grpc.RecordServiceStub(channel).PutRecord,
                          requests(header(patient), [data(300_000, seed=86)]), timeout=60)
    expect_error(error, grpc.StatusCode.UNAVAILABLE)
    assert crashing.process.wait(timeout=30) == 86, crashing.process.returncode

    service = service_factory(database_url, bucket=bucket)
    with service.channel() as channel:
        stub = pb_grpc.RecordServiceStub(channel)
        assert not list_all(stub, patient, all_versions=True), "an uncommitted put is listed"
        orphans = _object_keys(s3_server, bucket)
        assert len(orphans) == 1, f"{len(orphans)} objects instead of one orphan"

        sweep = _sweep_cli(service, softhsm_token)
        assert "removed 1 orphans" in sweep, sweep
        assert _object_keys(s3_server, bucket) == [], "the orphan is still there"

        content = data(400_000, seed=87)
        record = put(stub, patient, content)
        expect_same_content(get(stub, record.id)[1], content)
        keys = _object_keys(s3_server, bucket)
        assert len(keys) == 1, f"{len(keys)} objects after one put"
        assert keys != orphans, "the new record reuses the orphan's key"

    # A database writer deletes the row: the sweep keeps the object and raises an incident.
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as c:
            c.execute(records.delete().where(records.c.id == record.id))
        assert "removed 0 orphans" in _sweep_cli(service, softhsm_token)
        assert _object_keys(s3_server, bucket) == keys, "the record's object was swept"
        with engine.connect() as c:
            incidents = c.execute(sa.select(audit_events.c.status).where(
                audit_events.c.resource == f"object/{keys[0]}")).scalars().all()
        assert incidents == ["row-tampered"], incidents
    finally:
        engine.dispose()


def _sweep_cli(service: RunningService, softhsm_token: SoftHsmToken) -> str:
    """``medvault sweep --grace-seconds 0`` against the service's config; its stdout."""
    sweep = subprocess.run(
        [sys.executable, "-m", "service", "sweep", "--config", str(service.config_path),
         "--grace-seconds", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "SOFTHSM2_CONF": str(softhsm_token.conf_path)},
    )
    assert sweep.returncode == 0, f"sweep exit {sweep.returncode}: {sweep.stderr[-500:]}"
    return sweep.stdout


def _failed_start(service_factory: Factory, tmp_path: Path, **keystore: Any) -> str:
    """Start a server that must exit; returns its log."""
    service = service_factory(_sqlite_url(tmp_path), wait=False, keystore_overrides=keystore)
    try:
        code = service.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        service.stop()
        raise AssertionError("the server kept running") from None
    assert code != 0, "the server exited with 0"
    return service.log_path.read_text()


@pytest.mark.timeout(120)
def test_wrong_pin_stops_the_server(service_factory: Factory, tmp_path: Path) -> None:
    pin = secrets.token_hex(12)
    pin_file = tmp_path / "wrong.pin"
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pin + "\n")
    # The token of the wrong-PIN tests: failed logins never count against the main one.
    log = _failed_start(service_factory, tmp_path, token_label=WRONG_PIN_TOKEN_LABEL,
                        pin_file=str(pin_file), pin_env="")
    assert pin not in log, "the PIN is in the log"
    assert str(pin_file) in log, "the log does not name the PIN file"
    assert "PIN" in log, "the log does not say the PIN is the problem"


@pytest.mark.timeout(120)
def test_missing_token_stops_the_server(service_factory: Factory, tmp_path: Path) -> None:
    label = f"no-such-token-{secrets.token_hex(4)}"
    log = _failed_start(service_factory, tmp_path, token_label=label)
    assert label in log, "the log does not name the token label"
    assert "softhsm2-util --init-token" in log, "the log does not say how to create it"


@pytest.mark.timeout(120)
def test_a_database_file_rebuilt_in_utf16_stops_the_server(
    service_factory: Factory, tmp_path: Path
) -> None:
    """A database writer rebuilt the SQLite file in UTF-16 (SQLite then orders text
    otherwise): the server does not start on it, and says which encoding is the problem."""
    made = tmp_path / "made" / "metadata.db"
    made.parent.mkdir()
    engine = make_engine(f"sqlite:///{made}")
    upgrade(engine)
    engine.dispose()
    with sqlite3.connect(made) as old:
        dump = "\n".join(old.iterdump())
    old.close()
    rebuilt = sqlite3.connect(tmp_path / "metadata.db")  # where _failed_start's URL points
    rebuilt.execute("PRAGMA encoding = 'UTF-16le'")
    rebuilt.executescript(dump)
    rebuilt.close()
    log = _failed_start(service_factory, tmp_path)
    assert "metadata database file is encoded UTF-16le, not UTF-8" in log, "not named"
    assert "Traceback" not in log, "a start-up refusal with a traceback"
