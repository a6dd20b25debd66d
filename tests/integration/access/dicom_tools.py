"""dcmtk's storescu/findscu/getscu against a running service's DICOM port, as a hospital
runs them, a TLS tunnel for getscu (dcmtk 3.6.7, Debian 12's, has no TLS in getscu), and
one that holds a transfer midway (``HeldTunnel``).

Output of the tools is returned, never printed: it may name the (synthetic) patient.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
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


_CHUNK = 1 << 16
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class _Relay:
    """Both directions between a client's plain socket and a TLS socket to the service,
    in one thread: OpenSSL's SSL object may not be used by two threads at once. Two pump
    threads (one reading, one writing the same SSLSocket) lost a write now and then, or
    crashed the process in ``SSLSocket.send`` (test_dicom_tools). An A-ASSOCIATE-RQ lost
    so is what the one CI failure of test_dicom_spool looked like: the service closed the
    connection after its network timeout (60 s, the failed test's length) and pynetdicom
    said "Association Aborted", with nothing in the service's log.

    ``room()`` is how many more client bytes may go to the service (a ``HeldTunnel``'s
    allowance), ``sent(n)`` and ``returned(n)`` count, ``failed(what)`` gets an error's
    kind, ``stopped()`` ends the relay; the service's close is noted in ``service_closed``.
    """

    def __init__(self, plain: socket.socket, tls: ssl.SSLSocket,
                 room: Callable[[], int] = lambda: 1 << 62,
                 sent: Callable[[int], None] = lambda n: None,
                 returned: Callable[[int], None] = lambda n: None,
                 failed: Callable[[str], None] = lambda what: None,
                 stopped: Callable[[], bool] = lambda: False) -> None:  # fmt: skip
        self.plain, self.tls = plain, tls
        self.room, self.sent, self.returned = room, sent, returned
        self.failed, self.stopped = failed, stopped
        self.service_closed = False
        self._up, self._down = bytearray(), bytearray()  # read, not yet written on
        self._client_closed = self._plain_shut = False

    def run(self) -> None:
        self.plain.setblocking(False)
        self.tls.setblocking(False)
        try:
            while not self.stopped():
                moved = self._move_up()
                moved = self._move_down() or moved
                if self._client_closed and not self._up:
                    return  # the client is gone: the service's connection is closed below
                if not moved:
                    self._wait()
        except OSError as e:  # ssl.SSLError too
            if not self.stopped():
                self.failed(f"relay: {_kind(e)}")
        finally:
            for s in (self.plain, self.tls):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def _move_up(self) -> bool:
        """Client to service, up to the room left; True if bytes moved."""
        moved = False
        if not self._client_closed and len(self._up) < _CHUNK:
            with contextlib.suppress(*_WOULD_BLOCK):
                data = self.plain.recv(_CHUNK)
                self._client_closed = not data
                self._up += data
                moved = True
        n = min(len(self._up), self.room())
        if n > 0:  # a retried SSL write has the same bytes first, and no fewer
            with contextlib.suppress(*_WOULD_BLOCK):
                k = self.tls.send(self._up[:n])
                del self._up[:k]
                self.sent(k)
                moved = True
        return moved

    def _move_down(self) -> bool:
        """Service to client, and the service's close passed on; True if bytes moved."""
        moved = False
        if not self.service_closed and len(self._down) < _CHUNK:
            with contextlib.suppress(*_WOULD_BLOCK):
                data = self.tls.recv(_CHUNK)
                self.service_closed = not data
                self._down += data
                self.returned(len(data))
                moved = True
        if self._down:
            with contextlib.suppress(*_WOULD_BLOCK):
                del self._down[: self.plain.send(self._down)]
                moved = True
        if self.service_closed and not self._down and not self._plain_shut:
            self.plain.shutdown(socket.SHUT_WR)  # the client sees the service's close
            self._plain_shut = True
        return moved

    def _wait(self) -> None:
        """Until a socket can move bytes; polled, so a raised allowance or a stop is seen
        within 50 ms. Bytes the TLS object holds already are not waited for."""
        if self.tls.pending() and len(self._down) < _CHUNK:
            return
        readers = [s for s, done in ((self.plain, self._client_closed),
                                     (self.tls, self.service_closed)) if not done]  # fmt: skip
        writers = [s for s, busy in ((self.tls, min(len(self._up), self.room()) > 0),
                                     (self.plain, bool(self._down))) if busy]  # fmt: skip
        select.select(readers, writers, [], 0.05)


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
            threading.Thread(target=_Relay(inner, outer).run, daemon=True).start()

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
        self._relay: _Relay | None = None
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
        self._relay = _Relay(inner, outer, room=self._room, sent=self._sent,
                             returned=self._returned_more, failed=self._failed,
                             stopped=lambda: self._closed)  # fmt: skip
        self._relay.run()

    def _sent(self, n: int) -> None:
        with self._cond:
            self._forwarded += n
            self._cond.notify_all()

    def _returned_more(self, n: int) -> None:
        with self._cond:
            self._returned += n

    def seen(self) -> str:
        """What the tunnel saw, for a failed assertion: counts and error kinds only."""
        relay = self._relay
        closed = relay is not None and relay.service_closed
        with self._cond:
            return (f"tunnel {'connected' if self._connected else 'not connected'} to the "
                    f"service, {self._forwarded} bytes forwarded, {self._returned} returned, "
                    f"service {'closed' if closed else 'did not close'} the "
                    f"connection, errors {self.failures or 'none'}")  # fmt: skip

    def _room(self) -> int:
        with self._cond:
            return (1 << 62) if self._allowance is None else self._allowance - self._forwarded

    def allow(self, allowance: int | None) -> None:
        with self._cond:
            self._allowance = allowance
            self._cond.notify_all()

    def wait_forwarded(self, count: int, timeout: float = 60) -> None:
        with self._cond:
            done = self._cond.wait_for(lambda: self._forwarded >= count, timeout)
        assert done, f"{self._forwarded} bytes forwarded, not {count}"

    def close(self) -> None:
        """Cut both connections now (the kernel's shutdown, which leaves the TLS object to
        the relay's thread); the relay sees it and closes them."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(s, socket.SHUT_RDWR)
            self._listener.close()
