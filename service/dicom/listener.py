"""The DICOM listener: a pynetdicom AE on TLS with client certificates, in its own threads.

``medvault serve`` starts it when ``[dicom] listen`` is set and stops it on shutdown
(docs/formats.md, "DICOM network service"). It accepts the storage SOP classes (as
SCP, and as SCU within a C-GET), Study Root C-FIND and C-GET, and Verification.
Received instances are spooled by pynetdicom as they arrive, not held in memory, into
sealed nameless files of the service's spool folder (``service.dicom.spool``).
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import sys
import threading
import time
from collections import Counter
from typing import Any

import pynetdicom
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer

from service.config import Config, ConfigError
from service.dicom import retrieve, spool
from service.dicom.identity import ECHO, call_facts, server_context
from service.dicom.scp import DimseHandlers
from service.guard import AccessGuard
from storage import RecordStore

log = logging.getLogger(__name__)

# A C-STORE's data set goes to a temporary file as it arrives, not into memory.
pynetdicom._config.STORE_RECV_CHUNKED_DATASET = True
# pynetdicom logs the identifiers of queries and responses: patient data. Off, and its
# logger kept out of the service's log below WARNING.
pynetdicom._config.LOG_REQUEST_IDENTIFIERS = False
pynetdicom._config.LOG_RESPONSE_IDENTIFIERS = False
pynetdicom._config.LOG_HANDLER_LEVEL = "none"
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

MAX_PDU = 1 << 20
VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
# Deflate would inflate a bounded stream into an unbounded data set (the validator
# refuses it too): never negotiated. Explicit VR little endian first: when a peer offers
# several syntaxes in one context, the first of ours it offers is chosen, and a C-GET
# sends an instance unchanged only in the syntax it was stored in (the usual one).
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian] + [
    ts for ts in ALL_TRANSFER_SYNTAXES
    if ts not in (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian)
]


def _application_entity(config: Config) -> AE:
    dicom = config.dicom
    ae = AE(ae_title=dicom.ae_title)
    ae.maximum_associations = dicom.max_associations
    ae.network_timeout = dicom.network_timeout_seconds
    ae.acse_timeout = dicom.network_timeout_seconds
    ae.dimse_timeout = dicom.network_timeout_seconds
    # Peers send P-DATA PDUs up to this size (pynetdicom's default is 16 KiB: 32 PDUs
    # for a 512 KiB instance). One PDU is held in memory while it is decoded.
    ae.maximum_pdu_size = MAX_PDU
    ae.require_called_aet = True  # an association addressed to another AE is refused
    for abstract_syntax in (VERIFICATION, STUDY_ROOT_FIND, retrieve.STUDY_ROOT_GET):
        ae.add_supported_context(abstract_syntax)
    for context in AllStoragePresentationContexts:
        # SCP for C-STORE, SCU for the C-STORE sub-operations of a C-GET.
        ae.add_supported_context(
            str(context.abstract_syntax), TRANSFER_SYNTAXES, scu_role=True, scp_role=True
        )
    return ae


# Connections still in their TLS handshake (no certificate checked yet): anyone who can
# reach the port can open them, and each holds a thread and a descriptor until the
# handshake ends. Capped per peer address and in all, so one peer (or a few) cannot run
# the service out of threads or descriptors and lock every modality out; a handshake
# has HANDSHAKE_SECONDS at most (a real one takes milliseconds).
HANDSHAKES_PER_ADDRESS = 8
HANDSHAKES_IN_ALL = 128
HANDSHAKE_SECONDS = 10.0


class _HandshakeFailures:
    """Failed TLS handshakes (or, named by ``message``, the other errors a peer can
    cause at will: ``_Server.handle_error``), logged by kind (info) at most once per
    ``window`` seconds: anyone who can reach the port can fail handshakes, and must not
    fill the log. The first failure after a quiet window is logged at once; later ones
    are counted and logged together when the window ends (a timer), so none goes
    unreported."""

    def __init__(self, window: float = 10.0, message: str = "dicom tls handshake failed") -> None:
        self._window = window
        self._message = message
        self._counts: Counter[str] = Counter()
        self._next = 0.0  # monotonic time before which a line is not written
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def failed(self, kind: str) -> None:
        with self._lock:
            self._counts[kind] += 1
            wait = self._next - time.monotonic()
            if wait <= 0:
                self._emit()
            elif self._timer is None:
                self._schedule(wait)

    def _schedule(self, wait: float) -> None:  # under the lock
        timer = threading.Timer(wait, self._flush)
        timer.daemon = True
        try:
            timer.start()
        except RuntimeError:  # no thread left (a flood of connections, each in its own)
            return  # counted still: the next failure tries again, or writes them itself
        self._timer = timer

    def _flush(self) -> None:
        with self._lock:
            self._timer = None
            if not self._counts:
                return
            # Late (a busy host), a failure may have written the line and opened a new
            # window meanwhile: what came since waits for that window's end.
            wait = self._next - time.monotonic()
            if wait > 0:
                self._schedule(wait)
            else:
                self._emit()

    def _emit(self) -> None:  # under the lock
        # Kinds and counts only (a timeout, a certificate the CA did not sign, a peer
        # not speaking TLS): never the peer's address or anything it sent.
        log.info(self._message, extra={"failures": dict(self._counts)})
        self._counts.clear()
        self._next = time.monotonic() + self._window


class _Server(ThreadedAssociationServer):
    """pynetdicom's server with the TLS handshake moved out of the accepting thread.

    pynetdicom wraps each accepted socket in the one thread that accepts, and the
    accepted socket has no timeout: a peer that connects and sends nothing (no
    certificate needed) held every later association off for good. Here the accepting
    thread only accepts; the handshake runs in the connection's own thread, bounded by
    the network timeout, and a failed handshake only closes that connection.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handshake_failures = _HandshakeFailures()
        self.connection_errors = _HandshakeFailures(message="dicom connection error")
        self._handshaking: Counter[str] = Counter()  # handshakes in progress, by address
        self._handshaking_lock = threading.Lock()

    def get_request(self) -> tuple[Any, Any]:
        return self.socket.accept()  # type: ignore[union-attr]

    def process_request(self, request: Any, client_address: Any) -> None:
        """In the accepting thread: a connection over the handshake limits (its
        address's, or all of them) is closed at once, before it gets a thread."""
        address = str(client_address[0])
        with self._handshaking_lock:
            over = (self._handshaking[address] >= HANDSHAKES_PER_ADDRESS
                    or self._handshaking.total() >= HANDSHAKES_IN_ALL)  # fmt: skip
            if not over:
                self._handshaking[address] += 1
        if over:
            self.shutdown_request(request)
            self.handshake_failures.failed("TooManyHandshakes")
            return
        try:
            super().process_request(request, client_address)  # a thread of its own
        except BaseException:
            self._handshake_done(address)  # no thread: socketserver closes and reports
            raise

    def _handshake_done(self, address: str) -> None:
        with self._handshaking_lock:
            self._handshaking[address] -= 1
            if self._handshaking[address] <= 0:
                del self._handshaking[address]

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            try:
                network = self.ae.network_timeout or HANDSHAKE_SECONDS
                request.settimeout(min(network, HANDSHAKE_SECONDS))
                tls = self.ssl_context.wrap_socket(request, server_side=True)  # type: ignore[union-attr]
                tls.settimeout(None)  # as pynetdicom has it once associated
            finally:
                self._handshake_done(str(client_address[0]))
        except (OSError, ValueError) as e:
            request.close()
            # A peer that cannot associate is visible to the operator (by kind only).
            self.handshake_failures.failed(type(e).__name__)
            return
        super().process_request_thread(tls, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver's prints the peer's address and a traceback on stderr (the log)
        for each connection whose thread cannot start (a flood of connections, each
        holding one through its handshake) or whose association raised: anyone could
        fill the log with lines naming peers. The error's kind only, counted, at most
        a line per window."""
        self.connection_errors.failed(type(sys.exc_info()[1]).__name__)


class _PeerShares:
    """Associations held per client certificate: one certificate may hold at most a
    quarter of ``max_associations`` (at least one), so a single peer (any certificate
    of the client CA, with or without a role) cannot take every association and keep
    them alive with C-ECHOs. An association over its certificate's share is aborted as
    it opens, and logged with the certificate's CN (no patient data)."""

    def __init__(self, max_associations: int, guard: AccessGuard) -> None:
        self.share = max(1, max_associations // 4)
        self._guard = guard
        self._held: dict[bytes, int] = {}
        self._counted: dict[int, bytes] = {}  # id(association) -> its certificate's key
        self._lock = threading.Lock()

    @staticmethod
    def _key(assoc: Any) -> bytes | None:
        sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
        der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        return hashlib.sha256(der).digest() if der else None

    def on_open(self, event: Any) -> None:
        key = self._key(event.assoc)
        if key is None:
            return
        with self._lock:
            held = self._held.get(key, 0)
            over = held >= self.share
            if not over:
                self._held[key] = held + 1
                self._counted[id(event.assoc)] = key
        if over:
            event.assoc.abort()
            self._audit_refusal(event.assoc)

    def _audit_refusal(self, assoc: Any) -> None:
        """One denied event under the certificate's principal (entering as a C-ECHO
        would: a principal the policy refuses is audited by the guard itself)."""
        try:
            call = self._guard.enter(call_facts(assoc, ECHO))
            self._guard.audit(
                call, "dicom/association", outcome="denied", status="RESOURCE_EXHAUSTED",
                reason=f"over the certificate's share of {self.share} DICOM associations",
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001  (refused or unaudited: the abort stands)
            log.warning("dicom association over its share; aborted",
                        extra={"share": self.share, "error": type(e).__name__})  # fmt: skip

    def on_close(self, event: Any) -> None:
        with self._lock:
            key = self._counted.pop(id(event.assoc), None)  # counted down once
            if key is None:
                return
            left = self._held.get(key, 1) - 1
            if left > 0:
                self._held[key] = left
            else:
                self._held.pop(key, None)


def _release_spools(event: Any) -> None:
    """An association ended: the data sets it left unhandled give their disk back now."""
    spool.release(event.assoc)


class DicomListener:
    """The running DICOM service; ``stop`` closes the socket and its associations."""

    def __init__(self, config: Config, store: RecordStore, guard: AccessGuard) -> None:
        self._config = config
        self._handlers = DimseHandlers(store, guard, config.dicom.max_instance_size)
        retrieve.install()
        self._ae = _application_entity(config)
        self._shares = _PeerShares(config.dicom.max_associations, guard)
        self._server: Any = None

    @property
    def port(self) -> int:
        """The port listened on (useful with port 0)."""
        return int(self._server.server_address[1]) if self._server is not None else 0

    def start(self) -> int:
        """Listen (non-blocking); ``ConfigError`` if the address cannot be bound."""
        host, _, port = self._config.dicom.listen.rpartition(":")
        tls = self._config.tls
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._handlers.on_echo),
            (evt.EVT_C_STORE, self._handlers.on_store),
            (evt.EVT_C_FIND, self._handlers.on_find),
            (evt.EVT_C_GET, self._handlers.on_get),
            (evt.EVT_ACCEPTED, self._shares.on_open),
            (evt.EVT_RELEASED, self._shares.on_close),
            (evt.EVT_ABORTED, self._shares.on_close),
            (evt.EVT_CONN_CLOSE, self._shares.on_close),
            (evt.EVT_ABORTED, _release_spools),
            (evt.EVT_CONN_CLOSE, _release_spools),
        ]
        try:
            context = server_context(tls.cert, tls.key, tls.client_ca)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(
                "[tls] cert, key or client_ca cannot be loaded for [dicom]: "
                f"{getattr(e, 'strerror', None) or type(e).__name__}"
            ) from e
        self._prepare_spool()
        try:
            self._server = self._ae.make_server(
                (host.strip("[]"), int(port)), evt_handlers=handlers, ssl_context=context,
                server_class=_Server,
            )  # fmt: skip
        except OSError as e:
            raise ConfigError(
                f"[dicom] cannot listen on {self._config.dicom.listen}: {e.strerror}"
            ) from e
        thread = threading.Thread(target=self._server.serve_forever, name="dicom-accept",
                                  daemon=True)  # fmt: skip
        thread.start()
        # AE.shutdown stops (and aborts the associations of) the servers it knows; a
        # server made by make_server is not registered, and pynetdicom has no public way.
        self._ae._servers.append(self._server)
        log.info("dicom serving", extra={"listen": self._config.dicom.listen, "port": self.port,
                                         "ae_title": self._config.dicom.ae_title})  # fmt: skip
        return self.port

    def _prepare_spool(self) -> None:
        """Create and empty the spool folder, then have pynetdicom spool into it."""
        dicom = self._config.dicom
        folder = self._config.base_dir / dicom.spool_directory
        removed = spool.prepare(folder)
        # A count only: a leftover's name says nothing, its content is not looked at.
        log.info("dicom spool emptied", extra={"spool_directory": str(folder),
                                               "removed": removed})  # fmt: skip
        spool.install(dicom.max_instance_size, folder)

    def stop(self) -> None:
        """Stop accepting, abort the open associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._ae.shutdown()
