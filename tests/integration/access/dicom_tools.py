"""dcmtk's storescu/findscu/getscu against a running service's DICOM port, as a hospital
runs them, and a TLS tunnel for getscu (dcmtk 3.6.7, Debian 12's, has no TLS in getscu).

Output of the tools is returned, never printed: it may name the (synthetic) patient.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

AE_TITLE = "MEDVAULT"


@dataclass(frozen=True)
class Peer:
    """A DICOM client: its certificate and key, and the CA that signed the service's."""

    cert: Path
    key: Path
    ca: Path

    def tls(self) -> list[str]:
        return ["+tls", str(self.key), str(self.cert), "+cf", str(self.ca)]

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        context.check_hostname = False  # the dev server certificate names localhost
        context.load_cert_chain(str(self.cert), str(self.key))
        return context


def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def storescu(peer: Peer, port: int, files: list[Path]) -> subprocess.CompletedProcess[str]:
    return run(["storescu", *peer.tls(), "-aet", "MODALITY", "-aec", AE_TITLE,
                "127.0.0.1", str(port), *map(str, files)])


def findscu(peer: Peer, port: int, out: Path, keys: dict[str, str]
            ) -> subprocess.CompletedProcess[str]:
    out.mkdir(parents=True, exist_ok=True)
    args = [a for k, v in keys.items() for a in ("-k", f"{k}={v}" if v else k)]
    return run(["findscu", *peer.tls(), "-S", "-aet", "VIEWER", "-aec", AE_TITLE,
                "-X", "-od", str(out), *args, "127.0.0.1", str(port)])


def getscu(port: int, out: Path, keys: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """getscu to ``port`` (a tunnel's): plain DIMSE that the tunnel carries over TLS."""
    out.mkdir(parents=True, exist_ok=True)
    args = [a for k, v in keys.items() for a in ("-k", f"{k}={v}")]
    return run(["getscu", "-S", "-aet", "VIEWER", "-aec", AE_TITLE, "-od", str(out),
                *args, "127.0.0.1", str(port)])


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(1 << 16):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def tls_tunnel(peer: Peer, port: int) -> Iterator[int]:
    """A local port whose connections go on to ``port`` over TLS with ``peer``'s
    certificate (what stunnel does in front of a TLS-less DICOM tool)."""
    listener = socket.create_server(("127.0.0.1", 0))
    context = peer.context()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                inner, _ = listener.accept()
            except OSError:
                return
            outer = context.wrap_socket(socket.create_connection(("127.0.0.1", port)))
            for a, b in ((inner, outer), (outer, inner)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        listener.close()
