"""The local stack against the real SoftHSM2, SeaweedFS and service: what users run."""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service import config as service_config
from service.bootstrap import s3_client
from service.localstack import stack as stack_module
from service.localstack.layout import DEFAULT_SERVICE_PORT, find_pkcs11_module, rewrite_ports
from service.localstack.service_proc import check_health
from service.localstack.stack import LocalStack, LocalStackError
from tests.fixtures.service import ROOT

pytestmark = pytest.mark.integration

SECRETS = ("pin", "so-pin", "s3-access-key", "s3-secret-key")


def _snapshot(home: Path) -> dict[str, bytes]:
    """Every file the stack keeps (certificates, secrets, config), by relative path."""
    kept = [home / "config.toml", *(home / "ca").iterdir(), *(home / "secrets").iterdir()]
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(kept)}


@pytest.fixture
def stack(tmp_path: Path) -> LocalStack:
    # A space in the home checks that every path survives shell quoting.
    return LocalStack(tmp_path / "my stack", report=lambda line: None)


def test_prepare_twice_keeps_everything(stack: LocalStack) -> None:
    stack.prepare()
    first = _snapshot(stack.home)
    stack.prepare()

    assert _snapshot(stack.home) == first
    for name in SECRETS:
        secret = stack.home / "secrets" / name
        assert secret.stat().st_mode & 0o777 == 0o600, name
    assert (stack.home / "secrets").stat().st_mode & 0o777 == 0o700


def test_config_is_written_and_parses(stack: LocalStack) -> None:
    stack.prepare()
    config = service_config.load(stack.home / "config.toml")

    assert config.tls.enabled
    assert Path(config.tls.client_ca) == stack.home / "ca" / "ca.pem"
    assert config.database.url == f"sqlite:///{stack.home / 'db' / 'medvault.sqlite'}"
    assert config.keystore.token_label == "medvault"
    assert config.server.listen.startswith("127.0.0.1:")
    assert config.s3.endpoint.startswith("127.0.0.1:")
    assert config.server.listen != config.s3.endpoint


def test_operator_edits_are_never_overwritten(stack: LocalStack) -> None:
    stack.prepare()
    path = stack.home / "config.toml"
    edited = path.read_text().replace("chunk_size = 1048576", "chunk_size = 2097152")
    path.write_text(edited)

    stack.prepare()

    assert path.read_text() == edited


def test_taken_default_port_is_replaced_by_a_free_one(stack: LocalStack) -> None:
    with socket.socket() as squatter:
        # If someone holds the port already, that is just as good for this test.
        with contextlib.suppress(OSError):
            squatter.bind(("127.0.0.1", DEFAULT_SERVICE_PORT))
        stack.prepare()

    listen = service_config.load(stack.home / "config.toml").server.listen
    assert listen != f"127.0.0.1:{DEFAULT_SERVICE_PORT}"


def test_env_prints_quoted_exports_a_shell_can_eval(stack: LocalStack) -> None:
    stack.prepare()
    lines = stack.env().splitlines()

    assert [line.split("=", 1)[0] for line in lines] == [
        "export MEDVAULT_ENDPOINT",
        "export MEDVAULT_CA",
        "export MEDVAULT_CERT",
        "export MEDVAULT_KEY",
    ]
    script = f'{stack.env("local-app")}\nprintf "%s\\n" "$MEDVAULT_CERT" "$MEDVAULT_KEY"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        str(stack.home / "ca" / "client-local-app.pem"),
        str(stack.home / "ca" / "client-local-app.key"),
    ]


def test_env_names_unknown_clients(stack: LocalStack) -> None:
    stack.prepare()
    with pytest.raises(LocalStackError, match="no client certificate 'nobody'"):
        stack.env("nobody")


def test_env_output_never_carries_secrets(stack: LocalStack) -> None:
    stack.prepare()
    output = stack.env()
    lines = [c.line() for c in stack.status()]

    for name in SECRETS:
        secret = (stack.home / "secrets" / name).read_text().strip()
        assert secret not in output
        assert all(secret not in line for line in lines)


@pytest.fixture
def health_server(stack: LocalStack) -> Iterator[str]:
    """A bare gRPC health server with the stack's server certificate, mTLS required."""
    stack.prepare()
    ca = stack.home / "ca"
    credentials = grpc.ssl_server_credentials(
        [((ca / "server.key").read_bytes(), (ca / "server.pem").read_bytes())],
        root_certificates=(ca / "ca.pem").read_bytes(),
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


def test_health_check_speaks_mutual_tls_with_stack_certs(
    stack: LocalStack, health_server: str
) -> None:
    assert check_health(health_server, stack.tls_client("local-admin"))


def test_up_status_down_with_the_real_service(stack: LocalStack) -> None:
    try:
        stack.up(health_timeout=60)
        running = {c.name: c for c in stack.status()}
        assert running["service"].running
        assert running["seaweedfs"].running
        assert check_health(stack.endpoint(), stack.tls_client())

        stack.up()  # idempotent: everything already runs
        assert stack.status()[-1].pid == running["service"].pid
        # Written just before down, which SIGKILLs weed after a short grace.
        s3 = s3_client(service_config.load(stack.layout.config))
        content = os.urandom(300_000)
        s3.make_bucket("kept-across-down")
        s3.put_object("kept-across-down", "object", io.BytesIO(content), len(content))
    finally:
        stack.down()

    stopped = {c.name: c for c in stack.status()}
    assert not stopped["service"].running
    assert not stopped["seaweedfs"].running
    stack.down()  # idempotent
    endpoints = (stack.endpoint(), service_config.load(stack.layout.config).s3.endpoint)
    try:
        stack.up(health_timeout=60)
        # The same ports again (the last run's connections in TIME_WAIT do not take them):
        # what an operator exported from `stack env` still works.
        assert (stack.endpoint(),
                service_config.load(stack.layout.config).s3.endpoint) == endpoints
        response = s3.get_object("kept-across-down", "object")
        try:
            assert response.read() == content, "an acknowledged object changed across down"
        finally:
            response.close()
            response.release_conn()
    finally:
        stack.down()


def test_cli_env_prints_only_exports(stack: LocalStack) -> None:
    stack.prepare()
    result = subprocess.run(
        [".venv/bin/medvault", "stack", "env", "--home", str(stack.home), "--as", "local-app"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert all(line.startswith("export MEDVAULT_") for line in result.stdout.splitlines())
    assert shlex.quote(str(stack.home / "ca" / "ca.pem")) in result.stdout


def test_state_files_are_owner_only(stack: LocalStack) -> None:
    """Keys, PINs, config, policy and state are 0600 and every folder 0700; only
    certificates (public by nature) are readable by others."""
    stack.prepare()
    stack.prepare()  # a second run must not loosen anything
    for path in [stack.home, *stack.home.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        if path.is_dir():
            assert mode == 0o700, f"{path.relative_to(stack.home)}: {oct(mode)}"
        elif not path.name.endswith((".pem", ".crl")):
            assert mode == 0o600, f"{path.relative_to(stack.home)}: {oct(mode)}"


def _medvault(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEDVAULT_")}
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT, env={**clean, "MEDVAULT_HOME": str(home), **env},
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_status_exits_non_zero_while_a_component_is_down(stack: LocalStack) -> None:
    result = _medvault(stack.home, "stack", "status")
    assert result.returncode == 1, "status of a stack never prepared succeeded"
    stack.prepare()
    result = _medvault(stack.home, "stack", "status")
    assert result.returncode == 1, "status of a stopped stack succeeded"
    assert "not up: seaweedfs, service" in result.stderr


def test_two_stacks_started_at_once_never_share_a_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = LocalStack(tmp_path / "first", report=lambda line: None)
    second = LocalStack(tmp_path / "second", report=lambda line: None)
    try:
        first.up(health_timeout=60)
        second.prepare()
        # The race: the second stack chose and probed its port before the first bound
        # it. Record the first's port in the second's config, and let the probe miss.
        taken = int(first.endpoint().rpartition(":")[2])
        s3_port = int(service_config.load(second.layout.config).s3.endpoint.rpartition(":")[2])
        assert rewrite_ports(second.layout, taken, s3_port, find_pkcs11_module())
        second.start_seaweed()
        probes = iter([True])
        real_port_free = stack_module.port_free
        monkeypatch.setattr(stack_module, "port_free",
                            lambda port, *a: next(probes, None) or real_port_free(port, *a))
        second.start_service(health_timeout=60)
        assert next(probes, None) is None, "the service start did not probe its port"

        assert second.endpoint() != first.endpoint(), "both services listen on one port"
        for one in (first, second):  # each answers with its own CA and certificates
            assert check_health(one.endpoint(), one.tls_client())
        assert not check_health(first.endpoint(), second.tls_client())

        # A running stack: status succeeds, and a client without MEDVAULT_ENDPOINT uses
        # this stack and says so.
        assert _medvault(first.home, "stack", "status").returncode == 0
        listed = _medvault(first.home, "ls", "--patient", "P-1", "--authority", "urn:x")
        assert f"using the local stack in {first.home} ({first.endpoint()})" in listed.stderr
        assert "Traceback" not in listed.stderr
    finally:
        second.down()
        first.down()
