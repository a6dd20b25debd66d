"""What a new user sees when the CLI cannot connect: one line that says why, nothing else.

Each case runs the real ``medvault`` command as a subprocess against a real TLS gRPC
server (a bare health server with certificates of a development CA), so the error
strings of gRPC's C core and BoringSSL are the real ones the mapping has to read.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import service.localstack.ca as ca_module
from service.localstack.ca import DevCA, IssuedCert
from tests.fixtures.service import ROOT, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# gRPC's C-core log line: severity letter, MMDD, time, thread, file:line]
_CORE_LOG = re.compile(r"^[EWID]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]", re.MULTILINE)


@dataclass(frozen=True)
class Pki:
    """A CA with a client, a foreign CA, and leaves that are wrong in one way each."""

    ca: Path
    client: IssuedCert
    server: IssuedCert
    rogue_ca: Path
    rogue_client: IssuedCert
    wrong_name_server: IssuedCert
    expired_server: IssuedCert
    expired_client: IssuedCert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    ca = DevCA.load_or_create(base / "ca")
    client = ca.issue_client(base / "ca", "alice", role="admin")
    server = ca.issue_server(base / "ca")
    rogue = DevCA.load_or_create(base / "rogue")
    rogue_client = rogue.issue_client(base / "rogue", "mallory", role="admin")
    wrong_name = ca.issue_server(base / "wrong-name", hostnames=("elsewhere.example",), ips=())
    real_now = ca_module._now
    ca_module._now = lambda: real_now() - dt.timedelta(days=3000)  # issued long ago
    try:
        expired_server = ca.issue_server(base / "expired")
        expired_client = ca.issue_client(base / "expired", "old", role="admin")
    finally:
        ca_module._now = real_now
    return Pki(ca.cert_path, client, server, rogue.cert_path, rogue_client, wrong_name,
               expired_server, expired_client)  # fmt: skip


def _health_server(pki: Pki, leaf: IssuedCert) -> Iterator[str]:
    credentials = grpc.ssl_server_credentials(
        [(leaf.key.read_bytes(), leaf.cert.read_bytes())],
        root_certificates=pki.ca.read_bytes(),
        require_client_auth=True,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture(scope="module")
def good_server(pki: Pki) -> Iterator[str]:
    yield from _health_server(pki, pki.server)


@pytest.fixture(scope="module")
def wrong_name_server(pki: Pki) -> Iterator[str]:
    yield from _health_server(pki, pki.wrong_name_server)


@pytest.fixture(scope="module")
def expired_server(pki: Pki) -> Iterator[str]:
    yield from _health_server(pki, pki.expired_server)


class _Plain(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_port() -> Iterator[str]:
    """A listening port that speaks HTTP/1.1 in plaintext: not a gRPC port."""
    httpd = HTTPServer(("127.0.0.1", 0), _Plain)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MEDVAULT_", "GRPC_"))}  # fmt: skip
    env["MEDVAULT_HOME"] = str(tmp_path / "no-stack-here")
    return env


def _stat(tmp_path: Path, endpoint: str | None, ca: Path, cert: Path, key: Path,
          ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = _clean_env(tmp_path)
    if endpoint:
        env["MEDVAULT_ENDPOINT"] = endpoint
    env.update(MEDVAULT_CA=str(ca), MEDVAULT_CERT=str(cert), MEDVAULT_KEY=str(key))
    return subprocess.run(
        [sys.executable, "-m", "service", "stat", secrets.token_hex(16)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )


def _one_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode != 0, "the command succeeded"
    assert "Traceback" not in result.stderr, "a traceback was printed"
    assert not _CORE_LOG.search(result.stderr), "gRPC's C-core log lines reached the user"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"{len(lines)} error lines: {result.stderr[-400:]}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def test_reaches_a_good_server(pki: Pki, good_server: str, tmp_path: Path) -> None:
    # The control: the health server has no RecordService, so the call is refused by
    # the server (UNIMPLEMENTED), past every connection step the other cases fail.
    result = _stat(tmp_path, good_server, pki.ca, pki.client.cert, pki.client.key)
    _one_line(result, "UNIMPLEMENTED")


def test_nothing_listening(pki: Pki, tmp_path: Path) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    result = _stat(tmp_path, endpoint, pki.ca, pki.client.cert, pki.client.key)
    _one_line(result, f"cannot connect to {endpoint}", "nothing is listening")


def test_not_a_grpc_port(pki: Pki, http_port: str, tmp_path: Path) -> None:
    result = _stat(tmp_path, http_port, pki.ca, pki.client.cert, pki.client.key)
    _one_line(result, f"cannot connect to {http_port}", "does not speak TLS")


def test_server_of_an_unknown_ca(pki: Pki, good_server: str, tmp_path: Path) -> None:
    result = _stat(tmp_path, good_server, pki.rogue_ca, pki.client.cert, pki.client.key)
    _one_line(result, "not signed by --ca", str(pki.rogue_ca), "unknown CA")


def test_client_of_a_ca_the_server_does_not_trust(
    pki: Pki, good_server: str, tmp_path: Path
) -> None:
    result = _stat(tmp_path, good_server, pki.ca, pki.rogue_client.cert, pki.rogue_client.key)
    _one_line(result, "does not accept your certificate", str(pki.rogue_client.cert))


def test_server_name_mismatch(pki: Pki, wrong_name_server: str, tmp_path: Path) -> None:
    result = _stat(tmp_path, wrong_name_server, pki.ca, pki.client.cert, pki.client.key)
    _one_line(result, "server name mismatch", "does not name 127.0.0.1")


def test_expired_server_certificate(pki: Pki, expired_server: str, tmp_path: Path) -> None:
    result = _stat(tmp_path, expired_server, pki.ca, pki.client.cert, pki.client.key)
    _one_line(result, "server's certificate has expired")


def test_expired_client_certificate(pki: Pki, good_server: str, tmp_path: Path) -> None:
    result = _stat(tmp_path, good_server, pki.ca, pki.expired_client.cert,
                   pki.expired_client.key)  # fmt: skip
    _one_line(result, "your certificate", str(pki.expired_client.cert), "expired on")


@pytest.mark.parametrize("flag", ["ca", "cert", "key"])
def test_missing_tls_file(pki: Pki, good_server: str, tmp_path: Path, flag: str) -> None:
    files = {"ca": pki.ca, "cert": pki.client.cert, "key": pki.client.key}
    files[flag] = tmp_path / "absent.pem"
    result = _stat(tmp_path, good_server, files["ca"], files["cert"], files["key"])
    _one_line(result, f"cannot read --{flag} {files[flag]}", "No such file")


def test_key_of_another_certificate(pki: Pki, good_server: str, tmp_path: Path) -> None:
    result = _stat(tmp_path, good_server, pki.ca, pki.client.cert, pki.rogue_client.key)
    _one_line(result, "is not the key of --cert")


def test_certificate_that_is_not_pem(pki: Pki, good_server: str, tmp_path: Path) -> None:
    # A key where the certificate belongs: gRPC's C core logs "Invalid cert chain file".
    result = _stat(tmp_path, good_server, pki.ca, pki.client.key, pki.client.key)
    _one_line(result, f"--cert {pki.client.key} is not a PEM certificate")


def test_no_endpoint_and_no_stack_explains_what_to_set(pki: Pki, tmp_path: Path) -> None:
    result = _stat(tmp_path, None, pki.ca, pki.client.cert, pki.client.key)
    line = _one_line(result, "no local stack in", "MEDVAULT_ENDPOINT", "medvault stack up")
    assert "127.0.0.1:7443" not in line, "the old silent default is still named"


def test_key_path_that_is_a_directory(pki: Pki, good_server: str, tmp_path: Path) -> None:
    # Unreadable whoever runs it (even root, for whom a 0000 file is readable).
    result = _stat(tmp_path, good_server, pki.ca, pki.client.cert, tmp_path)
    _one_line(result, f"cannot read --key {tmp_path}", "Is a directory")
