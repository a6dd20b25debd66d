"""HL7 v2 over MLLP, on TLS with client certificates: each message stored as an HL7V2
record for its PID-3 patient and answered with an ACK (``service.hl7_ack``).

MLLP (HL7 v2 Appendix C) frames a message as ``0x0B`` message ``0x1C 0x0D``. The sender
waits for each ACK before the next message, so a connection's messages are handled in
order, one at a time. The framing is read here rather than with ``hl7.mllp`` because
that reader drops its buffer when a frame overruns its limit, and the AR of an oversized
frame should still name its MSH-10; the bounds are ours either way:

- a frame longer than ``[mllp] max_frame_bytes`` is answered AR and the connection
  closed (at most that plus one 64 KiB read is buffered per connection);
- a connection with no complete frame for ``idle_seconds`` is closed (a frame that
  never ends, too), and its pending bytes refused in the audit trail;
- at most ``max_connections`` connections, and ``max_connections_per_principal`` per
  certificate principal.

The certificate names the principal exactly as on gRPC (``service.authn``, CRL
included), checked when the connection opens and again, with the permission, for each
message: a message is a ``PutRecord`` to the access guard (``records.write``, patient
scope for scoped roles), validated, indexed and audited by the same write path. The
request id is derived from the sender (MSH-3, MSH-4) and MSH-10, per principal, so a
retransmitted message is acknowledged AA without a second record.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from service.audit import AuditUnavailableError
from service.authn import AuthenticationError, Principal
from service.authz import PermissionDeniedError
from service.config import Config, ConfigError, MllpConfig
from service.guard import AccessGuard, Call, CallFacts
from service.hl7_ack import (
    DATA_TYPE,
    DUPLICATE_KEY,
    ERROR,
    INTERNAL,
    REJECT,
    AckError,
    Envelope,
    ack,
    check_envelope,
    envelope,
    patient,
    pieces,
    request_key,
)
from service.status import status_for
from storage import (
    InvalidRecordError,
    NewRecord,
    RecordConflictError,
    RecordKind,
    RecordStore,
)

log = logging.getLogger(__name__)
START, END = b"\x0b", b"\x1c\x0d"
# The access guard sees each message as this RPC: its permission (records.write) and
# patient scope apply, and the trail names the action records.write.
PUT_METHOD = "/medvault.v1.RecordService/PutRecord"
CONTENT_TYPE = "x-application/hl7-v2+er7"
RESOURCE = "record/new"
_READ = 64 << 10
_STOP_GRACE = 10.0
# A TLS handshake not done by then is dropped (it holds no frame buffer).
_HANDSHAKE_SECONDS = 30.0


class FrameTooLargeError(Exception):
    """A frame passed the cap; ``prefix`` is its start (for the AR's MSH)."""

    def __init__(self, prefix: bytes) -> None:
        super().__init__("frame too large")
        self.prefix = prefix


class FrameTimeoutError(Exception):
    """No complete frame within the idle time; ``pending``: part of one had come."""

    def __init__(self, pending: bool) -> None:
        super().__init__("no complete frame in time")
        self.pending = pending


class Frames:
    """MLLP frames from a stream, with a bounded buffer and a deadline per frame."""

    def __init__(self, reader: asyncio.StreamReader, cap: int) -> None:
        self._reader = reader
        self._cap = cap
        self._buffer = bytearray()
        self._scanned = 0

    async def next(self, timeout: float) -> bytes | None:
        """The next frame's bytes between 0x0B and 0x1C 0x0D (the start byte kept, to
        be checked by the caller), or None at the end of the stream."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            end = self._buffer.find(END, max(0, self._scanned - 1))
            if end >= 0:
                frame = bytes(self._buffer[:end])
                del self._buffer[: end + len(END)]
                self._scanned = 0
                if len(frame) > self._cap + 1:
                    raise FrameTooLargeError(frame[: _READ])
                return frame
            self._scanned = len(self._buffer)
            if len(self._buffer) > self._cap + 1:
                raise FrameTooLargeError(bytes(self._buffer[:_READ]))
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise FrameTimeoutError(self._pending())
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a
                # cancellation (the listener stopping) that meets a completed read.
                async with asyncio.timeout(remaining):
                    data = await self._reader.read(_READ)
            except TimeoutError:
                raise FrameTimeoutError(self._pending()) from None
            if not data:
                return None
            self._buffer += data

    def _pending(self) -> bool:
        return bool(self._buffer.strip(b"\r\n"))


def message_of(frame: bytes) -> bytes:
    """The message inside a frame; AR when the frame does not start with 0x0B.

    Line ends left over after the previous frame's end (some senders add LF) are
    skipped."""
    frame = frame.lstrip(b"\r\n")
    if not frame.startswith(START):
        raise AckError(REJECT, INTERNAL, "MLLP frame does not start with 0x0B")
    return frame[1:]


def server_context(config: Config) -> ssl.SSLContext:
    """TLS with a required client certificate of ``[tls] client_ca`` (as gRPC)."""
    tls = config.tls
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_cert_chain(tls.cert, tls.key)
        context.load_verify_locations(cafile=tls.client_ca)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"[mllp] cannot load the [tls] certificates: {e}") from e
    return context


def _peer(address: object) -> str:
    """``ipv4:10.0.0.7:51234`` / ``ipv6:[::1]:51234``, as gRPC names peers."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"ipv6:[{host}]:{port}" if ":" in str(host) else f"ipv4:{host}:{port}"
    return "unknown"


def _facts(writer: asyncio.StreamWriter) -> CallFacts | None:
    """What the TLS handshake says about the client, as the gRPC auth context has it."""
    tls = writer.get_extra_info("ssl_object")
    der = tls.getpeercert(binary_form=True) if tls is not None else None
    if not der:
        return None
    subject = tls.getpeercert().get("subject", ())
    names = [v for rdn in subject for k, v in rdn if k == "commonName"]
    context = {"x509_pem_cert": [ssl.DER_cert_to_PEM_cert(der).encode()]}
    if names:
        context["x509_common_name"] = [str(names[0]).encode()]
    return CallFacts(PUT_METHOD, context, (), _peer(writer.get_extra_info("peername")))


@dataclass
class _Connection:
    writer: asyncio.StreamWriter
    busy: bool = False  # a message is being stored: let it finish on shutdown
    stopping: bool = False  # shutdown: no further message is read


class Handler:
    """One message in, its ACK out: authorise, parse, store, audit (blocking)."""

    def __init__(self, store: RecordStore, guard: AccessGuard, chunk_size: int,
                 authority: str) -> None:
        self._store = store
        self._guard = guard
        self._chunk_size = chunk_size
        self._authority = authority

    def message(self, facts: CallFacts, frame: bytes) -> bytes:
        """The ACK of one frame (stored, or refused and audited)."""
        try:
            call = self._guard.enter(facts)  # a denial is audited here
        except Exception as e:  # noqa: BLE001  (a denial, or the trail down: AR either way)
            return ack(_envelope_or_none(frame), _unaudited(e))
        env: Envelope | None = None
        try:
            message = message_of(frame)
            env = envelope(message)
            check_envelope(env)
            self._store_message(call, env, message)
            return ack(env)
        except Exception as e:  # noqa: BLE001  (every error becomes an audited AE/AR)
            refusal = self._refused(call, e)
            log.warning("mllp message refused", extra={
                "ack": refusal.ack, "err": refusal.code, "error": type(e).__name__,
            })  # fmt: skip
            return ack(env, refusal)

    def refuse(self, facts: CallFacts, frame: bytes, refusal: AckError, status: str) -> bytes:
        """Audit ``refusal`` of a frame that is not handled (too large) and its AR."""
        try:
            call = self._guard.enter(facts)
        except Exception as e:  # noqa: BLE001  (audited by enter, or the trail is down)
            _unaudited(e)
        else:
            self._guard.audit_failure(call, RESOURCE, status, refusal.text)
        log.warning("mllp frame refused", extra={"status": status})
        return ack(_envelope_or_none(frame), refusal)

    def _store_message(self, call: Call, env: Envelope, message: bytes) -> None:
        header = NewRecord(
            patient(message, env, self._authority), RecordKind.HL7V2, CONTENT_TYPE,
            title=f"{env.message_type} (MLLP)", request_id=request_key(env),
        )  # fmt: skip
        self._store.put(
            header, pieces(message, self._chunk_size), call.principal.name,
            admit=self._guard.scope_gate(call), on_commit=self._guard.commit_gate(call),
            on_replay=self._guard.replay_gate(call),
        )  # fmt: skip

    def _refused(self, call: Call, error: Exception) -> AckError:
        """The AE/AR of ``error``, audited as a failed records.write unless it was."""
        if isinstance(error, PermissionDeniedError):  # patient scope: audited by the gate
            return AckError(REJECT, INTERNAL, str(error))
        if isinstance(error, AuditUnavailableError):  # cannot be audited: fail closed
            return AckError(REJECT, INTERNAL, "audit trail unavailable; resend later")
        status, refusal = "INVALID_ARGUMENT", None
        if isinstance(error, AckError):
            refusal = error
        elif isinstance(error, InvalidRecordError):
            field = "PID-3" if error.field.startswith("patient") else error.field
            refusal = AckError(ERROR, DATA_TYPE, f"{field}: {error.problem}")
        elif isinstance(error, RecordConflictError):
            status = "FAILED_PRECONDITION"
            refusal = AckError(ERROR, DUPLICATE_KEY, "MSH-10 control id already used by this "
                                 "sender for a different message", "MSH^1^10")
        else:
            code, text = status_for(error)  # logs an unexpected error with a correlation id
            status, refusal = code.name, AckError(REJECT, INTERNAL, f"{text}; resend later")
        self._guard.audit_failure(call, RESOURCE, status, refusal.text)
        return refusal


def _unaudited(error: Exception) -> AckError:
    """The AR of a message refused before it was entered (denied: audited by the guard;
    an authentication refused; the trail or the token down: nothing can be audited)."""
    if isinstance(error, PermissionDeniedError | AuthenticationError):
        log.warning("mllp message denied", extra={"error": type(error).__name__})
        return AckError(REJECT, INTERNAL, str(error))
    _code, text = status_for(error)  # logs an unexpected error with a correlation id
    return AckError(REJECT, INTERNAL, f"{text}; resend later")


def _envelope_or_none(frame: bytes) -> Envelope | None:
    try:
        return envelope(message_of(frame))
    except AckError:
        return None


class MllpListener:
    """The asyncio server: TLS, the connection caps, framing and the idle deadline."""

    def __init__(self, config: MllpConfig, context: ssl.SSLContext, handler: Handler,
                 identify: Callable[[CallFacts], Principal],
                 refuse_connection: Callable[[Principal, str], None]) -> None:
        self._config = config
        self._context = context
        self._handler = handler
        self._identify = identify
        self._refuse_connection = refuse_connection
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        self._per_principal: Counter[str] = Counter()

    async def start(self) -> int:
        """Listen on ``[mllp] listen``; the port bound."""
        host, _, port = self._config.listen.rpartition(":")
        try:
            self._server = await asyncio.start_server(
                self._connected, host.strip("[]") or None, int(port), ssl=self._context,
                ssl_handshake_timeout=_HANDSHAKE_SECONDS, limit=_READ,
            )  # fmt: skip
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"[mllp] cannot listen on {self._config.listen} (port taken or address invalid)"
            ) from e
        bound: int = self._server.sockets[0].getsockname()[1]
        log.info("mllp listening", extra={"listen": self._config.listen, "port": bound})
        return bound

    async def stop(self) -> None:
        """Stop listening; let messages being stored finish (their ACK sent), drop the
        connections. Dropped, not cancelled: a pending read ends with the stream."""
        if self._server is None:
            return
        self._server.close()
        for connection in self._connections.values():
            connection.stopping = True
            if not connection.busy:  # nothing owed to it: dropped without a TLS goodbye
                connection.writer.transport.abort()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=_STOP_GRACE)
        for connection in self._connections.values():
            connection.writer.transport.abort()  # still storing after the grace

    async def _connected(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connection = _Connection(writer)
        self._connections[task] = connection
        try:
            if len(self._connections) > self._config.max_connections:
                log.warning("mllp connection refused: max_connections reached")
                return
            facts = _facts(writer)
            if facts is None:  # the context requires a certificate: cannot happen
                return
            try:
                principal = await asyncio.to_thread(self._identify, facts)  # audited
            except Exception as e:  # noqa: BLE001  (refused, or the trail down: closed)
                _unaudited(e)
                return
            name = principal.name
            if self._per_principal[name] >= self._config.max_connections_per_principal:
                reason = (f"too many MLLP connections for this principal (at most "
                          f"{self._config.max_connections_per_principal})")
                log.warning("mllp connection refused: over the principal's share")
                try:
                    await asyncio.to_thread(self._refuse_connection, principal, reason)
                except Exception as e:  # noqa: BLE001  (closed all the same)
                    _unaudited(e)
                return
            self._per_principal[name] += 1
            try:
                await self._serve(Frames(reader, self._config.max_frame_bytes), writer, facts,
                                  connection)
            finally:
                self._per_principal[name] -= 1
                if not self._per_principal[name]:
                    del self._per_principal[name]
        except (ConnectionError, ssl.SSLError, TimeoutError):
            pass  # the peer went away
        except asyncio.CancelledError:
            # The loop is closing (shutdown past the grace). Not re-raised: Python 3.11's
            # stream protocol logs a cancelled client task as an error.
            pass
        except Exception as e:  # noqa: BLE001  (this connection only; the listener stays)
            # The type only, no traceback: an error raised while reading a message may
            # quote it (as trail.py does for database errors).
            log.error("mllp connection failed", extra={"error": type(e).__name__})  # noqa: TRY400
        finally:
            del self._connections[task]
            writer.close()

    async def _serve(self, frames: Frames, writer: asyncio.StreamWriter, facts: CallFacts,
                     connection: _Connection) -> None:
        cap = self._config.max_frame_bytes
        while True:
            try:
                frame = await frames.next(self._config.idle_seconds)
            except FrameTimeoutError as e:
                if e.pending:  # a frame begun and never ended: refused, audited
                    refusal = AckError(REJECT, INTERNAL, "no MLLP frame end within "
                                         f"{self._config.idle_seconds:g} s")
                    await asyncio.to_thread(self._handler.refuse, facts, b"", refusal,
                                            "DEADLINE_EXCEEDED")
                return
            except FrameTooLargeError as e:
                refusal = AckError(REJECT, INTERNAL, f"MLLP frame larger than {cap} bytes")
                reply = await asyncio.to_thread(
                    self._handler.refuse, facts, e.prefix, refusal, "RESOURCE_EXHAUSTED"
                )
                await self._send(writer, reply)
                return
            if frame is None:
                return
            connection.busy = True
            try:
                reply = await asyncio.to_thread(self._handler.message, facts, frame)
            finally:
                connection.busy = False
            await self._send(writer, reply)
            if connection.stopping:
                return

    async def _send(self, writer: asyncio.StreamWriter, reply: bytes) -> None:
        writer.write(START + reply + END)
        async with asyncio.timeout(self._config.idle_seconds):
            await writer.drain()


def listener(config: Config, store: RecordStore, guard: AccessGuard) -> MllpListener:
    """The MLLP listener of ``[mllp]`` over the records use case and the access guard."""

    def refuse_connection(principal: Principal, reason: str) -> None:
        guard.audit_as(principal, "records.write", "mllp-connection", outcome="denied",
                       status="RESOURCE_EXHAUSTED", reason=reason)

    handler = Handler(store, guard, config.server.chunk_size, config.mllp.authority)
    return MllpListener(config.mllp, server_context(config), handler, guard.identify,
                        refuse_connection)


__all__ = ["Frames", "Handler", "MllpListener", "listener", "server_context"]
