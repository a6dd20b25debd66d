"""Starting SeaweedFS when a port found free is taken before weed binds it.

Test workers and operators start servers side by side, so a chosen port can be bound
by someone else between the choice and weed's own bind. These tests take the port
first on purpose and check that a real ``weed`` still comes up on another one.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

import service.localstack.seaweed as seaweed
import tests.fixtures.seaweed as seaweed_fixture
from service.localstack.seaweed import SeaweedError, SeaweedServer, _Ports


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port that passes the free-port check's +10000 rule but is listened on now."""
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
        if port < 65535 - 10000:
            break
        sock.close()
    sock.listen()
    try:
        yield port
    finally:
        sock.close()


def _write_ports(data_dir: Path, ports: _Ports) -> None:
    """ports.json as ``SeaweedServer`` writes it on first start."""
    seaweed.write_private(
        data_dir / seaweed._PORTS_FILE, json.dumps(dataclasses.asdict(ports)).encode()
    )


def _credentials() -> tuple[str, str]:
    return secrets.token_hex(10), secrets.token_hex(20)


def test_internal_port_taken_at_first_start_is_chosen_again(
    tmp_path: Path, taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_ports = SeaweedServer._ports
    handed_out: list[_Ports] = []

    def master_port_taken(self: SeaweedServer) -> _Ports:
        # The first choice is the one a rival binds in the meantime; it is written
        # to ports.json as a real choice is.
        if not handed_out:
            real = real_ports(self)
            clash = _Ports(master=taken_port, volume=real.volume, filer=real.filer)
            _write_ports(self.data_dir, clash)
            handed_out.append(clash)
            return clash
        chosen = real_ports(self)
        handed_out.append(chosen)
        return chosen

    monkeypatch.setattr(SeaweedServer, "_ports", master_port_taken)
    access_key, secret_key = _credentials()
    server = SeaweedServer(tmp_path / "data", seaweed.find_free_port(), access_key, secret_key)
    try:
        server.start(timeout=60)
        assert server.is_running()
        assert len(handed_out) >= 2, "weed started on a port that was taken"
        assert handed_out[-1].master != taken_port
        # The ports that worked are the ones persisted for the next start.
        assert str(handed_out[-1].master) in (tmp_path / "data" / "ports.json").read_text()
    finally:
        server.stop(timeout=2)


def test_persisted_ports_are_never_changed(tmp_path: Path, taken_port: int) -> None:
    data = tmp_path / "data"
    data.mkdir()
    free = seaweed.find_free_port({taken_port})
    _write_ports(
        data,
        _Ports(master=taken_port, volume=free, filer=seaweed.find_free_port({taken_port, free})),
    )
    before = (data / seaweed._PORTS_FILE).read_text()
    access_key, secret_key = _credentials()
    server = SeaweedServer(data, seaweed.find_free_port({taken_port}), access_key, secret_key)
    try:
        with pytest.raises(SeaweedError) as raised:
            server.start(timeout=60)
        assert raised.value.address_in_use
        # The error carries weed's own words, so CI output says why it failed.
        assert f"{taken_port}: bind: address already in use" in str(raised.value)
        assert "goroutine" not in str(raised.value)
        assert (data / seaweed._PORTS_FILE).read_text() == before
    finally:
        server.stop(timeout=2)


def test_test_fixture_chooses_another_s3_port_when_its_port_is_taken(
    tmp_path: Path, taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find = seaweed_fixture.find_free_port
    offered: list[int] = []

    def first_one_taken(exclude: set[int] | None = None) -> int:
        port = taken_port if not offered else real_find(exclude)
        offered.append(port)
        return port

    monkeypatch.setattr(seaweed_fixture, "find_free_port", first_one_taken)
    access_key, secret_key = _credentials()
    server = seaweed_fixture.start_seaweed(tmp_path / "data", access_key, secret_key)
    try:
        assert server.is_running()
        assert offered[0] == taken_port
        assert server.s3_port != taken_port
    finally:
        server.stop(timeout=2)


def test_taken_s3_port_is_reported_at_once_not_retried(tmp_path: Path, taken_port: int) -> None:
    """Other internal ports cannot help when the caller's S3 port is the one taken."""
    access_key, secret_key = _credentials()
    server = SeaweedServer(tmp_path / "data", taken_port, access_key, secret_key)
    try:
        with pytest.raises(SeaweedError) as raised:
            server.start(timeout=60)
        assert raised.value.address_in_use
        assert f"{taken_port}: bind: address already in use" in str(raised.value)
        log = server.log_file.read_text()
        assert log.count("bind: address already in use") == 1, "weed was started again"
    finally:
        server.stop(timeout=2)
