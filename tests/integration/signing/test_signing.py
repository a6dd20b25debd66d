"""SigningService end to end: real server, SoftHSM2 signers, SQLite and PostgreSQL.

PYTEST_DONT_REWRITE: failures name codes and fields, never record content.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from asn1crypto import cms
from asn1crypto import x509 as asn1_x509
from pyhanko.sign.validation.generic_cms import async_validate_detached_cms
from pyhanko_certvalidator import ValidationContext

from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import signing_pb2 as spb
from service._gen.medvault.v1 import signing_pb2_grpc as spb_grpc
from storage.signatures import record_signatures
from storage.sql_metadata import records
from tests.integration.access.helpers import (
    Client,
    audit_inserts_refused,
    audit_writer_held,
    code_of,
    engine_for,
    events,
    grant,
    new_patient,
    put_record,
    wait_for,
)
from tests.integration.signing.conftest import SigningStack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
TIMEOUT = 30
CONTENT = b"MSH|^~\\&|synthetic|signing test|" + bytes(range(256)) * 40


def _stub(c: Client) -> spb_grpc.SigningServiceStub:
    return spb_grpc.SigningServiceStub(c.channel)


def _record(stack: SigningStack, *doctors: str, content: bytes = CONTENT) -> str:
    """A record of a new patient, with care-team grants for ``doctors``."""
    clerk = stack.clients["clerk-s"]
    patient = new_patient()
    for doctor in doctors:
        grant(clerk, patient, doctor)
    return str(put_record(clerk, patient, content).id)


def _sign(stack: SigningStack, who: str, record_id: str, signer: str = "") -> spb.SignatureInfo:
    request = spb.SignRecordRequest(record_id=record_id, signer=signer or who)
    info: spb.SignatureInfo = _stub(stack.clients[who]).SignRecord(request, timeout=TIMEOUT)
    return info


def _verify(stack: SigningStack, who: str, record_id: str) -> list[spb.SignatureVerification]:
    reply = _stub(stack.clients[who]).VerifyRecord(
        spb.VerifyRecordRequest(record_id=record_id), timeout=TIMEOUT
    )
    return list(reply.results)


def _openssl_verify(tmp_path: Path, ca: Path, content: bytes, p7s: bytes) -> bool:
    (tmp_path / "content.bin").write_bytes(content)
    (tmp_path / "sig.p7s").write_bytes(p7s)
    result = subprocess.run(
        ["openssl", "cms", "-verify", "-binary", "-content", str(tmp_path / "content.bin"),
         "-inform", "DER", "-in", str(tmp_path / "sig.p7s"), "-CAfile", str(ca),
         "-out", "/dev/null"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return result.returncode == 0


def test_sign_and_cosign_verify(stack: SigningStack) -> None:
    record_id = _record(stack, "dr-ec", "dr-rsa", "nurse-s")
    ec = _sign(stack, "dr-ec", record_id)
    rsa = _sign(stack, "dr-rsa", record_id)
    assert (ec.algorithm, rsa.algorithm) == ("ecdsa-sha256", "rsa-pkcs1-sha256")
    assert ec.version == 1
    assert ec.certificate_subject == "CN=dr-ec,O=medvault tests"
    results = _verify(stack, "nurse-s", record_id)  # nurses verify, they do not sign
    assert [(r.signature.id, r.valid, r.reason) for r in results] == [
        (ec.id, True, ""),
        (rsa.id, True, ""),
    ]


def test_get_signature_verifies_with_openssl_and_pyhanko(
    stack: SigningStack, tmp_path: Path
) -> None:
    record_id = _record(stack, "dr-ec")
    info = _sign(stack, "dr-ec", record_id)
    reply = _stub(stack.clients["dr-ec"]).GetSignature(
        spb.GetSignatureRequest(signature_id=info.id), timeout=TIMEOUT
    )
    assert reply.signature.id == info.id
    ca = stack.ca.cert_path
    assert _openssl_verify(tmp_path, ca, CONTENT, reply.p7s)
    tampered = bytearray(CONTENT)
    tampered[100] ^= 0x01
    assert not _openssl_verify(tmp_path, ca, bytes(tampered), reply.p7s)
    # pyHanko's public validator, independently of the service's code path.
    signed_data = cms.ContentInfo.load(reply.p7s)["content"]
    anchor = asn1_x509.Certificate.load(
        __import__("cryptography.x509", fromlist=["x"]).load_pem_x509_certificate(
            ca.read_bytes()).public_bytes(__import__(
                "cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]
            ).Encoding.DER)
    )  # fmt: skip
    status = asyncio.run(async_validate_detached_cms(
        io.BytesIO(CONTENT), signed_data,
        signer_validation_context=ValidationContext(trust_roots=[anchor]),
    ))  # fmt: skip
    assert status.bottom_line
    attrs = {a["type"].native for a in signed_data["signer_infos"][0]["signed_attrs"]}
    assert {"content_type", "message_digest", "signing_time",
            "signing_certificate_v2"} <= attrs  # fmt: skip
    assert signed_data["encap_content_info"]["content"].native is None  # detached


def test_other_principal_cannot_use_a_signer(stack: SigningStack) -> None:
    record_id = _record(stack, "dr-ec", "dr-rsa")
    stub = _stub(stack.clients["dr-rsa"])
    request = spb.SignRecordRequest(record_id=record_id, signer="dr-ec")
    assert code_of(stub.SignRecord, request, timeout=TIMEOUT) == grpc.StatusCode.PERMISSION_DENIED
    denied = events(stack.clients["officer-s"], principal="dr-rsa",
                    outcome=aupb.OUTCOME_DENIED)  # fmt: skip
    assert any(e.resource == "signer/dr-ec" for e in denied)
    assert _verify(stack, "dr-ec", record_id) == []  # nothing was signed


def test_no_grant_and_unknown_signer(stack: SigningStack) -> None:
    record_id = _record(stack, "dr-none")
    stub = _stub(stack.clients["dr-nogrant"])
    request = spb.SignRecordRequest(record_id=record_id, signer="dr-nogrant")
    # No signer and no grant: the signer check comes first and names the command.
    code = code_of(stub.SignRecord, request, timeout=TIMEOUT)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as raised:
        _sign(stack, "dr-none", record_id)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "medvault keys create-signer dr-none" in (raised.value.details() or "")
    other = _record(stack)  # dr-ec has no grant for this patient
    assert code_of(_stub(stack.clients["dr-ec"]).SignRecord,
                   spb.SignRecordRequest(record_id=other, signer="dr-ec"),
                   timeout=TIMEOUT) == grpc.StatusCode.PERMISSION_DENIED  # fmt: skip


def test_untrusted_ca_is_invalid_with_reason(stack: SigningStack) -> None:
    record_id = _record(stack, "dr-rogue", "dr-ec")
    _sign(stack, "dr-rogue", record_id)
    _sign(stack, "dr-ec", record_id)
    results = _verify(stack, "dr-ec", record_id)
    assert [r.valid for r in results] == [False, True]
    assert "untrusted chain" in results[0].reason


def test_expired_certificate_cannot_sign(stack: SigningStack) -> None:
    record_id = _record(stack, "dr-old")
    with pytest.raises(grpc.RpcError) as raised:
        _sign(stack, "dr-old", record_id)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "import-cert dr-old" in (raised.value.details() or "")


def test_tampered_content_fails_verification(stack: SigningStack, s3_server: object) -> None:
    record_id = _record(stack, "dr-ec")
    _sign(stack, "dr-ec", record_id)
    engine = engine_for(stack.database_url)
    try:
        with engine.connect() as c:
            key = c.scalar(sa.select(records.c.object_key).where(records.c.id == record_id))
    finally:
        engine.dispose()
    import tomllib  # noqa: PLC0415

    bucket = tomllib.loads(stack.service.config_path.read_text())["s3"]["bucket"]
    s3 = s3_server.client()  # type: ignore[attr-defined]
    response = s3.get_object(bucket, key)
    blob = bytearray(response.read())
    response.close()
    response.release_conn()
    blob[-20] ^= 0x01
    s3.put_object(bucket, key, io.BytesIO(bytes(blob)), len(blob))
    stub = _stub(stack.clients["dr-ec"])
    code = code_of(stub.VerifyRecord, spb.VerifyRecordRequest(record_id=record_id),
                   timeout=TIMEOUT)  # fmt: skip
    assert code == grpc.StatusCode.DATA_LOSS
    assert hashlib.sha256(CONTENT).digest()  # the content itself is never printed


@pytest.mark.parametrize(
    ("column", "forged"),
    [
        ("signer", "dr-rsa"),
        ("certificate_subject", "CN=dr-rsa,O=medvault tests"),
        ("algorithm", "rsa-pkcs1-sha256"),
        ("signing_time", datetime(2020, 6, 1, tzinfo=UTC)),
    ],
)
def test_edited_signature_column_is_data_loss(
    stack: SigningStack, column: str, forged: Any
) -> None:
    """The columns shown beside a signature are bound to it: a database edit is DATA_LOSS."""
    record_id = _record(stack, "dr-ec")
    signature = _sign(stack, "dr-ec", record_id)
    assert [r.valid for r in _verify(stack, "dr-ec", record_id)] == [True]
    engine = engine_for(stack.database_url)
    try:
        with engine.begin() as c:
            c.execute(
                record_signatures.update()
                .where(record_signatures.c.id == signature.id)
                .values({column: forged})
            )
    finally:
        engine.dispose()
    stub = _stub(stack.clients["dr-ec"])
    code = code_of(stub.VerifyRecord, spb.VerifyRecordRequest(record_id=record_id),
                   timeout=TIMEOUT)  # fmt: skip
    assert code == grpc.StatusCode.DATA_LOSS


def _signature_events(stack: SigningStack) -> list[str]:
    found = events(stack.clients["officer-s"], principal="dr-ec", action="signatures.sign")
    return [e.resource for e in found if e.resource.startswith("signature/")]


@pytest.mark.parametrize("refused", ["signature/", "record/"])
def test_signature_not_stored_when_its_event_cannot_commit(
    stack: SigningStack, refused: str
) -> None:
    """Fail closed: the signature row commits with its own audit event, or not at all;
    and not at all when the read of the record (queued while the token signs) could not
    be committed."""
    record_id = _record(stack, "dr-ec")
    before = _signature_events(stack)
    engine = engine_for(stack.database_url)
    # Exactly the signing events of ``refused``: the new signatures' (``signature/``) or
    # the read of the record signed (``record/``).
    when = f"NEW.action = 'signatures.sign' AND NEW.resource LIKE '{refused}%'"
    try:
        with audit_inserts_refused(stack.database_url, engine, when):
            request = spb.SignRecordRequest(record_id=record_id, signer="dr-ec")
            code = code_of(_stub(stack.clients["dr-ec"]).SignRecord, request, timeout=TIMEOUT)
        assert code == grpc.StatusCode.UNAVAILABLE, code.name
        with engine.connect() as c:
            stored = c.execute(
                sa.select(sa.func.count()).where(record_signatures.c.record_id == record_id)
            ).scalar_one()
        assert stored == 0, "a signature was stored without its audit event"
    finally:
        engine.dispose()
    assert _verify(stack, "dr-ec", record_id) == []
    assert _signature_events(stack) == before
    signature = _sign(stack, "dr-ec", record_id)  # works again once events commit
    assert [r.valid for r in _verify(stack, "dr-ec", record_id)] == [True]
    assert _signature_events(stack) == [*before, f"signature/{signature.id}"]


@pytest.mark.parametrize("columns", ["sealed_meta", "whole row"])
def test_signs_only_the_digest_sealed_for_this_record(stack: SigningStack, columns: str) -> None:
    """SignRecord signs the row's sealed SHA-256 without re-reading the content: a
    database writer who gives record A the metadata of record B (same patient, other
    content) must get DATA_LOSS, never a signature of B's digest under A's name."""
    clerk = stack.clients["clerk-s"]
    patient = new_patient()
    grant(clerk, patient, "dr-ec")
    target = str(put_record(clerk, patient, CONTENT).id)
    other = str(put_record(clerk, patient, CONTENT[::-1]).id)
    kept = ("id", "version", "object_key")  # object keys are unique: A keeps its own
    copied = [c.name for c in records.columns if c.name not in kept]
    if columns == "sealed_meta":
        copied = ["sealed_meta"]
    engine = engine_for(stack.database_url)
    try:
        with engine.begin() as c:
            source = c.execute(sa.select(records).where(records.c.id == other)).one()
            c.execute(
                records.update().where(records.c.id == target)
                .values({name: getattr(source, name) for name in copied})
            )  # fmt: skip
        request = spb.SignRecordRequest(record_id=target, signer="dr-ec")
        code = code_of(_stub(stack.clients["dr-ec"]).SignRecord, request, timeout=TIMEOUT)
        assert code == grpc.StatusCode.DATA_LOSS, code.name
        with engine.connect() as c:
            stored = c.execute(
                sa.select(sa.func.count()).where(record_signatures.c.record_id == target)
            ).scalar_one()
        assert stored == 0, "a signature was made over another record's digest"
    finally:
        engine.dispose()
    _sign(stack, "dr-ec", other)  # the record whose metadata was copied is untouched
    assert [r.valid for r in _verify(stack, "dr-ec", other)] == [True]


@pytest.mark.parametrize("ending", ["deadline", "cancel"])
def test_no_signature_stored_for_a_call_that_ended_while_its_read_event_waited(
    stack: SigningStack, ending: str
) -> None:
    """Attack: SignRecord's token signs while its read event commits; the call's end (its
    deadline, or its client cancelling) lands while the event still waits. The client is
    told the call failed, so no signature may appear in its name afterwards: a retry
    would make a second one, and the signer never saw the first."""
    record_id = _record(stack, "dr-ec")
    engine = engine_for(stack.database_url)
    stub = _stub(stack.clients["dr-ec"])
    request = spb.SignRecordRequest(record_id=record_id, signer="dr-ec")
    try:
        with audit_writer_held(stack.database_url, engine):
            if ending == "deadline":
                code = code_of(stub.SignRecord, request, timeout=1.0)
                assert code == grpc.StatusCode.DEADLINE_EXCEEDED, code.name
            else:
                future = stub.SignRecord.future(request, timeout=TIMEOUT)
                time.sleep(1.0)  # the token has signed; the read event waits
                future.cancel()
                with pytest.raises(grpc.FutureCancelledError):
                    future.result()
            time.sleep(2.0)  # the worker waits on, past the call's end
        wait_for(lambda: _reads_settled(stack, record_id), 40, "the read event to settle")
        # A barrier: the worker queues the signature's change as soon as its read event
        # committed; this query's own audit event is queued after that (the trail is
        # first in, first out) and committed before the query answers.
        _reads_settled(stack, record_id)
        with engine.connect() as c:
            stored = c.execute(
                sa.select(sa.func.count()).where(record_signatures.c.record_id == record_id)
            ).scalar_one()
        assert stored == 0, f"a signature was stored after the call's {ending}"
    finally:
        engine.dispose()


def _reads_settled(stack: SigningStack, record_id: str) -> bool:
    """The call's read event is in the trail (it commits once the writer is free)."""
    found = events(stack.clients["officer-s"], principal="dr-ec", action="signatures.sign")
    return any(e.resource.startswith(f"record/{record_id}") for e in found)
