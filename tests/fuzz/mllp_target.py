"""Fuzz target: an MLLP connection's bytes, as the listener reads them.

Frames off a stream (``service.mllp.Frames``, a small cap so the too-large path is
reached), then for each frame what the handler does before the store: the 0x0B start,
the MSH envelope, the message type and control id, the character set, PID-3 (both
authority preferences), the request key, and the ACK. Documented: ``AckError`` (AE or
AR); an ACK is always built and starts with MSH.
"""

from __future__ import annotations

import asyncio

from service.hl7_ack import AckError, ack, check_envelope, codec, envelope, patient, request_key
from service.mllp import Frames, FrameTooLargeError, message_of
from tests import content
from tests.fuzz.formats_targets import PATIENT

CAP = 4096


async def _frames(data: bytes) -> list[bytes | FrameTooLargeError]:
    """The frames a connection sending ``data`` (in 3 reads, then EOF) yields."""
    reader = asyncio.StreamReader()
    third = len(data) // 3 + 1
    for start in range(0, len(data), third):
        reader.feed_data(data[start : start + third])
    reader.feed_eof()
    frames = Frames(reader, CAP)
    out: list[bytes | FrameTooLargeError] = []
    while True:
        try:
            frame = await frames.next(timeout=5.0)
        except FrameTooLargeError as e:
            return [*out, e]
        if frame is None:
            return out
        out.append(frame)


def _reply(frame: bytes) -> bytes:
    env = None
    try:
        message = message_of(frame)
        env = envelope(message)
        check_envelope(env)
        codec(env)
        for prefer in ("oid", "namespace"):
            patient(message, env, prefer)
        request_key(env)
    except AckError as refusal:
        return ack(env, refusal)
    return ack(env)


def target(data: bytes) -> None:
    """Every frame of ``data`` gets an ACK; only AckError is raised on the way."""
    for frame in asyncio.run(_frames(data)):
        if isinstance(frame, FrameTooLargeError):
            reply = ack(None, AckError("AR", 207, "MLLP frame larger than the cap"))
        else:
            reply = _reply(frame)
        if not reply.startswith(b"MSH"):
            raise AssertionError("an ACK that does not start with MSH")


def seeds() -> list[bytes]:
    """One framed ORU^R01, and two frames with a stray LF and no final end."""
    message = content.hl7v2(PATIENT.id, PATIENT.authority)
    return [b"\x0b" + message + b"\x1c\x0d", b"\x0b" + message + b"\x1c\x0d\n\x0b" + message]
