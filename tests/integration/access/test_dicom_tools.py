"""The TLS tunnels of dicom_tools: what a client writes right after the tunnel's
handshake reaches the service, while the service's first TLS 1.3 records (its session
tickets) arrive. Relayed by two threads on one SSLSocket, such a write was lost now and
then (the service then closed the connection after its timeout: "association refused"
in test_dicom_spool) or the process crashed."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator

import pytest

from tests.fixtures.service import TlsFiles
from tests.integration.access.dicom_tools import HeldTunnel, Peer, tls_tunnel

pytestmark = pytest.mark.integration

CONNECTIONS = 300
MESSAGE = b"A-ASSOCIATE-RQ, as it were: " + bytes(range(64))
CAP = 20  # seconds a lost message is waited for (a cap, not a measured time)


@contextlib.contextmanager
def _echo_service(tls: TlsFiles) -> Iterator[int]:
    """A TLS 1.3 service asking for client certificates (as the DICOM listener), each
    connection in its own thread: it reads one message and sends it back."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca))
    context.load_cert_chain(str(tls.server_cert), str(tls.server_key))
    context.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0), backlog=CONNECTIONS)

    def one(raw: socket.socket) -> None:
        with contextlib.suppress(OSError), raw:
            raw.settimeout(CAP)
            with context.wrap_socket(raw, server_side=True) as conn:
                got = b""
                while len(got) < len(MESSAGE) and (data := conn.recv(len(MESSAGE))):
                    got += data
                conn.sendall(got)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                raw, _ = listener.accept()
                threading.Thread(target=one, args=(raw,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        listener.close()


def _echoed(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=CAP) as c:
        c.sendall(MESSAGE)
        got = b""
        with contextlib.suppress(OSError):
            while len(got) < len(MESSAGE) and (data := c.recv(len(MESSAGE))):
                got += data
        return got == MESSAGE


def test_tls_tunnel_loses_no_write(tls_files: TlsFiles) -> None:
    peer = Peer(tls_files.client_cert, tls_files.client_key, tls_files.ca)
    with _echo_service(tls_files) as service, tls_tunnel(peer, service) as port:
        lost = [i for i in range(CONNECTIONS) if not _echoed(port)]
    assert lost == [], f"{len(lost)} of {CONNECTIONS} messages not echoed through tls_tunnel"


def test_held_tunnel_loses_no_write(tls_files: TlsFiles) -> None:
    peer = Peer(tls_files.client_cert, tls_files.client_key, tls_files.ca)
    lost = []
    with _echo_service(tls_files) as service:
        for _ in range(CONNECTIONS):
            tunnel = HeldTunnel(peer, service, None)
            try:
                if not _echoed(tunnel.port):
                    lost.append(tunnel.seen())
            finally:
                tunnel.close()
    assert lost == [], f"{len(lost)} of {CONNECTIONS} not echoed through HeldTunnel: {lost[:3]}"
