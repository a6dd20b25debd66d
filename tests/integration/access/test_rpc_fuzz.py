"""Attack: hostile request messages on every RPC, from callers holding every role.

Property-based fuzzing (hypothesis) against the real service: for each method found in
the protobuf descriptors, requests are built field by field from the method's message
type (text with NULs, bidi and astral characters, huge and negative numbers, unknown
enum values, nested messages, timestamps at and beyond the calendar's edges) and also
sent as raw random bytes. Every call must end in a status the API documents for bad
input or missing rights, never ``UNKNOWN``, ``INTERNAL`` or ``DATA_LOSS``; afterwards
the service is healthy, a legitimate round trip works and the audit chain verifies.

Methods that start long jobs or change key state (backup runs and drills, KEK rotation,
retirement, rewrap, pruning, signer creation and import) are fuzzed only by callers
whose role may not call them:
the refusal path is what a hostile caller meets; their decoding is the same code
(``service/wire.py``) as every other method's.

PYTEST_DONT_REWRITE: failures name methods and codes, never what was sent.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service._gen.medvault.v1 import (
    access_pb2,
    audit_pb2,
    backup_pb2,
    keys_pb2,
    records_pb2,
    signing_pb2,
    stats_pb2,
)
from tests.fixtures.service import DEFAULT_POLICY, RunningService
from tests.integration.access.helpers import (
    Client,
    client,
    events,
    fetch,
    new_patient,
    put_record,
    verify,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

EXAMPLES = int(os.environ.get("MEDVAULT_FUZZ_EXAMPLES", "12"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=os.environ.get("MEDVAULT_FUZZ_RANDOM") != "1",
)
CALL_TIMEOUT = 30
ROLES = ["physician", "records_clerk", "security_officer", "backup_operator", "key_admin",
         "admin", None]  # fmt: skip
SIDE_EFFECTS = ("RunBackup", "RunRestoreDrill", "RotateKek", "RetireKek", "Rewrap", "Prune",
                "CreateSigner", "ImportCertificate")
# What bad input or missing rights may legitimately end in.
DOCUMENTED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.ABORTED,
}  # fmt: skip
TEXT = st.text(
    st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(["\x00", "\u202e", "\u2066", "\ufeff", "\U0001f600", "\n", "%", "'"]),
    ),
    max_size=40,
) | st.sampled_from(["", "x" * 300, "a" * 5000, "../../etc/passwd", "NaN", "-1", "0" * 40])
INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _methods() -> list[tuple[str, MethodDescriptor]]:
    pool = descriptor_pool.Default()
    found = []
    for module in (access_pb2, audit_pb2, backup_pb2, keys_pb2, records_pb2, signing_pb2,
                   stats_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                found.append((f"/{service.full_name}/{method.name}", method))
    assert pool is not None
    return sorted(found, key=lambda m: m[0])


METHODS = _methods()


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_STRING:
        return TEXT
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=80)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, 40)  # proto3 enums are open: unknown values arrive too
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    low, high = INT_RANGES[field.type]
    edges = st.sampled_from([low, high, 0, -1, 1, 2**31, 2**31 - 1, 253402300800])
    return edges.filter(lambda v: low <= v <= high) | st.integers(low, high)


@st.composite
def message(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Message:
    """A message of ``descriptor``'s type with hostile values in a random subset of fields."""
    msg = GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        repeated = field.is_repeated
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry or depth >= 3:
                continue
            values = [draw(message(field.message_type, depth + 1))
                      for _ in range(draw(st.integers(1, 3)) if repeated else 1)]  # fmt: skip
            if repeated:
                getattr(msg, field.name).extend(values)
            else:
                getattr(msg, field.name).CopyFrom(values[0])
        elif repeated:
            getattr(msg, field.name).extend(draw(st.lists(_scalar(field), max_size=4)))
        else:
            setattr(msg, field.name, draw(_scalar(field)))
    return msg


@dataclasses.dataclass
class World:
    service: RunningService
    channels: dict[str | None, grpc.Channel]
    physician: Client
    clerk: Client
    officer: Client
    calls: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)


@pytest.fixture(scope="module")
def world(service_factory: Any, fresh_database: str, issue: Any) -> Iterator[World]:
    # A small incident threshold would not change outcomes; the default policy is used.
    service: RunningService = service_factory(fresh_database, policy=DEFAULT_POLICY.read_text())
    certs: dict[str | None, tuple[Path, Path]] = {
        role: issue(_principal(role), role) for role in ROLES
    }
    channels = {role: service.channel(*cert) for role, cert in certs.items()}
    world = World(
        service, channels,
        physician=client(service, issue("fuzz-dr", "physician")),
        clerk=client(service, issue("fuzz-clerk2", "records_clerk")),
        officer=client(service, issue("fuzz-officer2", "security_officer")),
    )  # fmt: skip
    yield world
    for channel in channels.values():
        channel.close()
    for c in (world.physician, world.clerk, world.officer):
        c.close()
    service.stop()


def _principal(role: str | None) -> str:
    return f"fuzz-{role or 'norole'}"


def _role_may_call(method: str, role: str | None) -> bool:
    if any(name in method.rsplit("/", 1)[1] for name in SIDE_EFFECTS):
        return role not in ("backup_operator", "key_admin")
    return True


def _invoke(channel: grpc.Channel, method: MethodDescriptor, path: str, body: bytes,
            chunks: list[bytes]) -> grpc.StatusCode:  # fmt: skip
    """One call with serialized ``body`` (streamed requests: ``body`` then ``chunks``)."""
    try:
        if method.client_streaming:
            stream = channel.stream_stream if method.server_streaming else channel.stream_unary
            result = stream(path)(iter([body, *chunks]), timeout=CALL_TIMEOUT)
        elif method.server_streaming:
            result = channel.unary_stream(path)(body, timeout=CALL_TIMEOUT)
        else:
            channel.unary_unary(path)(body, timeout=CALL_TIMEOUT)
            return grpc.StatusCode.OK
        if method.server_streaming:
            for _ in result:
                pass
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("path", "method"), METHODS, ids=[p for p, _ in METHODS])
@FUZZ
@given(data=st.data())
def test_structured_hostile_requests_get_documented_codes(
    world: World, path: str, method: MethodDescriptor, data: st.DataObject
) -> None:
    role = data.draw(st.sampled_from([r for r in ROLES if _role_may_call(path, r)]))
    request = data.draw(message(method.input_type))
    chunks = []
    if method.client_streaming:
        follow = data.draw(st.lists(message(method.input_type), max_size=3))
        chunks = [m.SerializeToString() for m in follow]
    code = _invoke(world.channels[role], method, path, request.SerializeToString(), chunks)
    world.calls[_principal(role)] += 1
    assert code in DOCUMENTED, f"{path} as {role}: {code.name}"


@pytest.mark.parametrize(("path", "method"), METHODS, ids=[p for p, _ in METHODS])
@FUZZ
@given(data=st.data())
def test_raw_random_bytes_get_documented_codes(
    world: World, path: str, method: MethodDescriptor, data: st.DataObject
) -> None:
    role = data.draw(st.sampled_from([r for r in ROLES if _role_may_call(path, r)]))
    body = data.draw(st.binary(min_size=1, max_size=200))
    code = _invoke(world.channels[role], method, path, body, [])
    world.calls[_principal(role)] += 1
    assert code in DOCUMENTED, f"{path} as {role}: {code.name}"


def test_service_is_whole_after_the_fuzzing(world: World) -> None:
    """Runs after the fuzz tests of this module (definition order): nothing was broken."""
    patient = new_patient()
    world.clerk.access.GrantAccess(
        access_pb2.GrantAccessRequest(patient=patient, principal="fuzz-dr"), timeout=30
    )
    record = put_record(world.physician, patient, b"synthetic after fuzzing")
    fetched = fetch(world.physician, record.id)
    assert fetched.error is None, fetched.code.name
    assert fetched.content == b"synthetic after fuzzing"
    assert verify(world.officer).ok
    # Every fuzzed call, refused or not, left at least one event under its caller's name.
    assert sum(world.calls.values()) > 0, "the fuzz tests did not run first"
    for principal, calls in sorted(world.calls.items()):
        logged = len(events(world.officer, principal=principal))
        assert logged >= calls, f"{principal}: {calls} calls, {logged} events"
