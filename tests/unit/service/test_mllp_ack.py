"""The MLLP pieces without a server: reading MSH and PID-3, building ACKs, the framing's
bounds, the [mllp] configuration checks."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import hl7
import pytest

from service import hl7_ack
from service.audit import AuditUnavailableError
from service.authz import PermissionDeniedError
from service.config import ConfigError, parse
from service.hl7_ack import AckError, ack, authority, check_envelope, envelope, patient
from service.mllp import Frames, FrameTimeoutError, FrameTooLargeError, Handler, message_of
from storage import (
    BackendUnavailableError,
    InvalidRecordError,
    PatientRef,
    RecordConflictError,
)
from tests import content

AUTH = "urn:oid:2.999.1"


def _parsed(reply: bytes) -> hl7.Message:
    return hl7.parse(reply.decode("latin-1"))


def test_ack_swaps_sender_and_receiver_and_echoes_the_control_id() -> None:
    env = envelope(content.hl7v2("P1", AUTH, control_id="C-42"))
    check_envelope(env)
    reply = _parsed(ack(env))
    msh = reply.segment("MSH")
    assert [str(msh[n]) for n in (3, 4, 5, 6)] == ["EMR", "HOSP", "LAB", "HOSP"]
    assert str(msh[9]) == "ACK^R01^ACK"
    assert (str(msh[11]), str(msh[12])) == ("P", "2.5.1")
    assert [str(f) for f in reply.segment("MSA")[1:3]] == ["AA", "C-42"]
    assert str(msh[10]) != "C-42", "the ACK needs a control id of its own"


def test_refusal_has_err_with_code_location_and_escaped_text() -> None:
    env = envelope(content.hl7v2("P1", AUTH, control_id="C-1"))
    refusal = AckError("AE", 101, "PID-3 needs CX.1 | CX.4 ^ here", "PID^1^3")
    reply = _parsed(ack(env, refusal))
    assert str(reply.segment("MSA")[1]) == "AE"
    err = reply.segment("ERR")
    assert str(reply.extract_field("ERR", 1, 3, 1, 1)) == "101"
    assert str(reply.extract_field("ERR", 1, 3, 1, 3)) == "HL70357"
    assert str(reply.extract_field("ERR", 1, 2, 1, 1)) == "PID"
    assert str(err[4]) == "E"
    assert str(err[8]) == "PID-3 needs CX.1 \\F\\ CX.4 \\S\\ here"  # delimiters escaped
    assert reply.unescape(str(err[8])) == refusal.text


def test_ack_keeps_the_senders_encoding_characters() -> None:
    message = content.hl7v2("P1", AUTH).replace(b"|", b"#").replace(b"MSH#^~\\&", b"MSH#^~\\&")
    env = envelope(message)
    assert env.separators == "#^~\\&"
    reply = ack(env, AckError("AR", 207, "a # b"))
    assert reply.startswith(b"MSH#^~\\&#EMR#HOSP#LAB#HOSP#")
    assert b"a \\F\\ b" in reply


def test_ack_without_a_readable_msh_uses_the_default_header() -> None:
    reply = _parsed(ack(None, AckError("AR", 100, "message does not start with an MSH")))
    assert [str(f) for f in reply.segment("MSA")[1:3]] == ["AR", ""]


@pytest.mark.parametrize(("message", "code"), [
    (b"HELLO", 100),
    (b"MSH|AAAA|x", 102),  # encoding characters not punctuation
    (b"MSH|^~\\&|" + b"^" * 3000, 102),  # too many delimiters
    (b"MSH|^~\\&|LAB" + b"x" * (70 << 10), 100),  # no segment end within 64 KiB
])
def test_unreadable_msh_is_rejected(message: bytes, code: int) -> None:
    with pytest.raises(AckError) as refused:
        envelope(message)
    assert (refused.value.ack, refused.value.code) == ("AR", code)


def test_msh9_and_msh10_are_required() -> None:
    good = content.hl7v2("P1", AUTH, control_id="C-1")
    for broken, named in ((good.replace(b"|C-1|", b"||"), "MSH-10"),
                          (good.replace(b"ORU^R01^ORU_R01", b"ORU"), "MSH-9")):
        with pytest.raises(AckError) as refused:
            check_envelope(envelope(broken))
        assert refused.value.ack == "AR"
        assert named in refused.value.text


def test_patient_comes_from_the_first_pid3_repetition() -> None:
    message = content.hl7v2("P1", AUTH)
    env = envelope(message)
    assert patient(message, env) == PatientRef("P1", AUTH)
    assert patient(message, env, "namespace") == PatientRef("P1", "HOSP")
    with pytest.raises(AckError) as refused:
        patient(message.replace(b"^^^HOSP&2.999.1&ISO^MR", b""), env)
    assert (refused.value.ack, refused.value.location) == ("AE", "PID^1^3")
    assert "P1" not in refused.value.text


@pytest.mark.parametrize(("hd", "prefer", "expected"), [
    (("HOSP", "1.2.3", "ISO"), "oid", "urn:oid:1.2.3"),
    (("HOSP", "1.2.3", "ISO"), "namespace", "HOSP"),
    (("HOSP", "", ""), "oid", "HOSP"),
    (("", "1.2.3", "ISO"), "namespace", "urn:oid:1.2.3"),
    (("", "lab.example", "DNS"), "oid", "lab.example"),
    (("HOSP", "lab.example", "DNS"), "oid", "HOSP"),
])
def test_authority_mapping(hd: tuple[str, str, str], prefer: str, expected: str) -> None:
    assert authority(*hd, prefer) == expected


def test_request_key_is_per_sender_and_control_id() -> None:
    a = envelope(content.hl7v2("P1", AUTH, control_id="C-1"))
    b = envelope(content.hl7v2("P2", AUTH, control_id="C-1"))
    c = envelope(content.hl7v2("P1", AUTH, control_id="C-2"))
    d = envelope(content.hl7v2("P1", AUTH, control_id="C-1").replace(b"|LAB|", b"|LAB2|"))
    assert hl7_ack.request_key(a) == hl7_ack.request_key(b)
    assert len({hl7_ack.request_key(e) for e in (a, c, d)}) == 3
    assert 16 <= len(hl7_ack.request_key(a)) <= 64


def _frames(data: bytes, cap: int) -> Frames:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    return Frames(reader, cap)


def test_frames_are_split_and_bounded() -> None:
    async def run() -> None:
        frames = _frames(b"\x0bA\x1c\r\n\x0bBB\x1c\r", 1024)
        assert message_of(await frames.next(5) or b"") == b"A"
        assert message_of(await frames.next(5) or b"") == b"BB"  # a stray LF is skipped
        big = _frames(b"\x0bMSH|" + b"x" * 2000, 1024)
        with pytest.raises(FrameTooLargeError) as too_large:
            await big.next(5)
        assert too_large.value.prefix.startswith(b"\x0bMSH|")
        slow = _frames(b"\x0bMSH|", 1024)
        with pytest.raises(FrameTimeoutError) as idle:
            await slow.next(0.01)
        assert idle.value.pending
        with pytest.raises(AckError):
            message_of(b"MSH|no start byte")

    asyncio.run(run())


def _config(**mllp: object) -> dict[str, object]:
    return {"database": {"url": "sqlite://"}, "tls": {"cert": "c", "key": "k", "client_ca": "a"},
            "mllp": mllp}


@pytest.mark.parametrize(("mllp", "named"), [
    ({"listen": "127.0.0.1:2575", "max_frame_bytes": 10}, "max_frame_bytes"),
    ({"listen": "127.0.0.1:2575", "idle_seconds": 0}, "idle_seconds"),
    ({"listen": "127.0.0.1:2575", "max_connections_per_principal": 0}, "max_connections"),
    ({"listen": "127.0.0.1:2575", "authority": "hd2"}, "authority"),
    ({"listen": "127.0.0.1:2575", "port": 1}, "unknown key"),
])
def test_mllp_configuration_is_checked(mllp: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse(_config(**mllp), Path())
    assert named in str(refused.value)


def test_mllp_needs_tls() -> None:
    raw = _config(listen="127.0.0.1:2575")
    raw["tls"] = {"enabled": False}
    with pytest.raises(ConfigError, match=r"\[mllp\] needs \[tls\]"):
        parse(raw, Path())
    assert parse(_config(), Path()).mllp.listen == ""  # off by default


class _Guard:
    """Just what ``Handler`` asks of the access guard; records the failures audited."""

    def __init__(self, enter_error: Exception | None = None) -> None:
        self.enter_error = enter_error
        self.failures: list[tuple[str, str]] = []

    def enter(self, facts: object) -> object:
        if self.enter_error is not None:
            raise self.enter_error
        return SimpleNamespace(principal=SimpleNamespace(name="lab"))

    def audit_failure(self, call: object, resource: str, status: str, reason: str) -> None:
        self.failures.append((status, reason))

    def scope_gate(self, call: object) -> object:
        return None

    commit_gate = replay_gate = scope_gate


class _Store:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.headers: list[object] = []

    def put(self, header: object, chunks: object, creator: str, **gates: object) -> None:
        self.headers.append(header)
        if self.error is not None:
            raise self.error


def _answer(guard: _Guard, store: _Store) -> hl7.Message:
    handler = Handler(store, guard, 1 << 20, "oid")  # type: ignore[arg-type]
    frame = b"\x0b" + content.hl7v2("P1", AUTH, control_id="C-9")
    return _parsed(handler.message(None, frame))  # type: ignore[arg-type]


@pytest.mark.parametrize(("error", "expected", "status"), [
    (None, ("AA", ""), None),
    (RecordConflictError("request_id: already used"), ("AE", "205"), "FAILED_PRECONDITION"),
    (InvalidRecordError("content", "HL7 v2: more than one PID"), ("AE", "102"),
     "INVALID_ARGUMENT"),
    (BackendUnavailableError("database unavailable"), ("AR", "207"), "UNAVAILABLE"),
    (RuntimeError("boom P1"), ("AR", "207"), "INTERNAL"),
    (AuditUnavailableError("audit trail unavailable"), ("AR", "207"), None),
    (PermissionDeniedError("no active care-team grant"), ("AR", "207"), None),
])
def test_handler_maps_each_outcome_to_its_ack_and_audit(
    error: Exception | None, expected: tuple[str, str], status: str | None
) -> None:
    guard, store = _Guard(), _Store(error)
    reply = _answer(guard, store)
    code = str(reply.extract_field("ERR", 1, 3, 1, 1)) if expected[0] != "AA" else ""
    assert (str(reply.segment("MSA")[1]), code) == expected
    assert str(reply.segment("MSA")[2]) == "C-9"
    assert [s for s, _ in guard.failures] == ([status] if status else [])
    assert "P1" not in str(reply)
    header = store.headers[0]
    assert (header.patient, header.kind.value) == (PatientRef("P1", AUTH), "HL7V2")


def test_handler_rejects_before_reading_when_not_authorised() -> None:
    store = _Store()
    reply = _answer(_Guard(PermissionDeniedError("role(s) x lack records.write")), store)
    assert str(reply.segment("MSA")[1]) == "AR"
    assert "records.write" in str(reply.segment("ERR")[8])
    assert store.headers == []
    reply = _answer(_Guard(AuditUnavailableError("audit trail unavailable")), store)
    assert "resend later" in str(reply.segment("ERR")[8])
    assert store.headers == []
