"""dcmtk's storescu/findscu/getscu against a running service's DICOM port, as a hospital
runs them, a TLS tunnel for getscu (dcmtk 3.6.7, Debian 12's, has no TLS in getscu), and
one that holds a transfer midway (``HeldTunnel``).

Output of the tools is returned, never printed: it may name the (synthetic) patient.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import sys
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


def _kind(e: OSError) -> str:
    """An error's kind and the library's reason (or errno), never data."""
    return f"{type(e).__name__}: {getattr(e, 'reason', None) or e.errno}"


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
            try:
                outer = context.wrap_socket(socket.create_connection(("127.0.0.1", port)))
            except OSError as e:  # ssl.SSLError too: say so, and let the tool fail now
                # Only the error's kind and the library's reason, never data (stderr is
                # shown with a failed test; the tool then fails on a closed connection
                # instead of waiting out its association timeout).
                print(f"tls_tunnel: {_kind(e)}", file=sys.stderr)
                inner.close()
                continue
            for a, b in ((inner, outer), (outer, inner)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        listener.close()


def dataset_part(data: bytes) -> bytes:
    """The bytes after the File Meta Information (its group length says where it ends)."""
    assert data[128:132] == b"DICM", "not Part 10"
    assert data[132:136] == b"\x02\x00\x00\x00", "file meta group length first"
    return data[144 + int.from_bytes(data[140:144], "little") :]


class HeldTunnel:
    """A TLS tunnel (as ``tls_tunnel``, one connection) that forwards the client's bytes
    only up to an allowance: a transfer stopped at a known point, as long as a test needs.

    ``allow(n)`` raises the allowance (``None``: no limit), ``wait_forwarded(n)`` waits
    until ``n`` bytes went through, ``close`` drops both sides (the peer sees the
    connection cut midway).
    """

    def __init__(self, peer: Peer, port: int, allowance: int | None) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._context = peer.context()
        self._target = port
        self._allowance = allowance
        self._forwarded = 0
        self._returned = 0  # bytes the service sent back
        self._connected = False
        self._service_closed = False
        self._closed = False
        self._sockets: list[socket.socket] = [self._listener]
        self._cond = threading.Condition()
        self.failures: list[str] = []  # what went wrong, kinds only (``_kind``)
        threading.Thread(target=self._serve, daemon=True).start()

    def _failed(self, what: str) -> None:
        with self._cond:
            if self._closed:  # closed by the test: errors expected
                return
            self.failures.append(what)
        print(f"HeldTunnel: {what}", file=sys.stderr)

    def _serve(self) -> None:
        try:
            inner, _ = self._listener.accept()
        except OSError:  # closed before a client came
            return
        try:
            outer = self._context.wrap_socket(socket.create_connection(("127.0.0.1", self._target)))
        except OSError as e:  # ssl.SSLError too: say so (as tls_tunnel), and drop the client
            self._failed(f"connect: {_kind(e)}")
            inner.close()
            return
        with self._cond:
            self._sockets += [inner, outer]
            self._connected = True
        threading.Thread(target=self._pump_held, args=(inner, outer), daemon=True).start()
        threading.Thread(target=self._pump_back, args=(outer, inner), daemon=True).start()

    def _pump_back(self, src: socket.socket, dst: socket.socket) -> None:
        """The service's bytes to the client, unheld; counted, and its close noted."""
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                with self._cond:
                    self._returned += len(data)
            with self._cond:
                self._service_closed = True
        except OSError as e:
            self._failed(f"returning: {_kind(e)}")
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def seen(self) -> str:
        """What the tunnel saw, for a failed assertion: counts and error kinds only."""
        with self._cond:
            return (f"tunnel {'connected' if self._connected else 'not connected'} to the "
                    f"service, {self._forwarded} bytes forwarded, {self._returned} returned, "
                    f"service {'closed' if self._service_closed else 'did not close'} the "
                    f"connection, errors {self.failures or 'none'}")  # fmt: skip

    def _room(self) -> int:
        return (1 << 62) if self._allowance is None else self._allowance - self._forwarded

    def _pump_held(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                view = memoryview(data)
                while view:
                    with self._cond:
                        self._cond.wait_for(lambda: self._closed or self._room() > 0)
                        if self._closed:
                            return
                        n = min(len(view), self._room())
                    dst.sendall(view[:n])
                    view = view[n:]
                    with self._cond:
                        self._forwarded += n
                        self._cond.notify_all()
        except OSError as e:
            self._failed(f"forwarding: {_kind(e)}")

    def allow(self, allowance: int | None) -> None:
        with self._cond:
            self._allowance = allowance
            self._cond.notify_all()

    def wait_forwarded(self, count: int, timeout: float = 60) -> None:
        with self._cond:
            done = self._cond.wait_for(lambda: self._forwarded >= count, timeout)
        assert done, f"{self._forwarded} bytes forwarded, not {count}"

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
