"""Request messages off the wire: decoded and checked before any handler sees them.

grpc decodes a request before the handler runs; if that fails the caller gets a bare
INTERNAL and nothing is audited. So the edge decodes itself: an undecodable message or
a string field with invalid UTF-8 becomes ``InvalidRecordError`` naming the field, and
so does a NUL character in any string field (PostgreSQL cannot store one, and no
identifier, name or reason needs one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from storage import InvalidRecordError

_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE
_LENGTH_DELIMITED = 2


@dataclass(frozen=True, slots=True)
class Rejected:
    """What the edge's deserializer hands on instead of a message it refused."""

    error: InvalidRecordError


def decode(cls: type[Message], data: bytes) -> Message | Rejected:
    """``data`` as a ``cls`` message, or the refusal naming what is wrong (never raises)."""
    try:
        message = cls.FromString(data)
    except (DecodeError, RecursionError, ValueError):
        field = _bad_utf8(cls.DESCRIPTOR, data)
        if field:
            return Rejected(InvalidRecordError(field, "is not valid UTF-8"))
        return Rejected(
            InvalidRecordError("request", f"is not a valid {cls.DESCRIPTOR.full_name} message")
        )
    field = find_nul(message)
    if field:
        return Rejected(InvalidRecordError(field, "contains a NUL character"))
    return message


def find_nul(message: Message, prefix: str = "") -> str:
    """The path of the first string field holding a NUL character, or ``""``."""
    for field, value in message.ListFields():
        path = prefix + field.name
        repeated = field.is_repeated
        values: list[Any] = list(value) if repeated else [value]
        for i, item in enumerate(values):
            where = f"{path}[{i}]" if repeated else path
            if field.type == _STRING and "\x00" in item:
                return where
            if field.type == _MESSAGE:
                found = find_nul(item, where + ".")
                if found:
                    return found
    return ""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]  # IndexError on truncation: the caller gives up
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80 or shift > 63:
            return value, pos
        shift += 7


def _skip(data: bytes, pos: int, wire_type: int) -> int | None:
    """The position after a field that is not length-delimited, or None (give up)."""
    if wire_type == 0:
        return _varint(data, pos)[1]
    if wire_type in (1, 5):
        return pos + (8 if wire_type == 1 else 4)
    return None  # groups (3, 4) or garbage


def _bad_utf8(descriptor: Any, data: bytes, prefix: str = "", depth: int = 0) -> str:
    """Walk the wire format for the first string field that is not UTF-8; ``""`` if none.

    Best effort, for the error message only: anything unexpected gives up.
    """
    if depth > 8:  # our messages nest three deep; deeper is garbage
        return ""
    pos = 0
    try:
        while pos < len(data):
            tag, pos = _varint(data, pos)
            if tag & 7 != _LENGTH_DELIMITED:
                after = _skip(data, pos, tag & 7)
                if after is None:
                    return ""
                pos = after
                continue
            length, pos = _varint(data, pos)
            chunk, pos = data[pos : pos + length], pos + length
            found = _bad_utf8_in(descriptor.fields_by_number.get(tag >> 3), chunk, prefix, depth)
            if found:
                return found
    except IndexError:
        return ""
    return ""


def _bad_utf8_in(field: Any, chunk: bytes, prefix: str, depth: int) -> str:
    """The path of ``field`` (or a field inside it) if its bytes are not UTF-8."""
    if field is None:
        return ""
    if field.type == _STRING:
        try:
            chunk.decode()
        except UnicodeDecodeError:
            return f"{prefix}{field.name}"
        return ""
    if field.type == _MESSAGE:
        return _bad_utf8(field.message_type, chunk, f"{prefix}{field.name}.", depth + 1)
    return ""
