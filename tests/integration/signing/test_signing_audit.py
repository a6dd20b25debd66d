"""SignRecord's audit events (issue 12): the read of the record signed commits in the
transaction of the signature's own event and row; real server, SoftHSM2, SQLite and
PostgreSQL.

The read event is held past the scope check (a denial is committed at once) and
commits with ``signature/<id>``; if the signing fails before that commit, it commits
alone before the error leaves. Nothing is returned before it is committed.
"""

from __future__ import annotations

import contextlib
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager

import grpc
import pytest
import sqlalchemy as sa
from pkcs11 import Attribute

from keystore import Pkcs11SessionPool
from keystore.certificates import signer_label
from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import signing_pb2 as spb
from service._gen.medvault.v1 import signing_pb2_grpc as spb_grpc
from storage.signatures import record_signatures
from tests.integration.access.helpers import (
    audit_inserts_refused,
    audit_writer_held,
    code_of,
    engine_for,
    events,
    grant,
    inserts_refused,
    new_patient,
    put_record,
    verify,
    wait_for,
)
from tests.integration.signing.conftest import SigningStack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
TIMEOUT = 30
CONTENT = b"MSH|^~\\&|synthetic|signing audit test|" + bytes(range(256)) * 4


def _record(stack: SigningStack, *doctors: str) -> str:
    """A record of a new patient, with care-team grants for ``doctors``."""
    clerk = stack.clients["clerk-s"]
    patient = new_patient()
    for doctor in doctors:
        grant(clerk, patient, doctor)
    return str(put_record(clerk, patient, CONTENT).id)


def _request(record_id: str, signer: str) -> spb.SignRecordRequest:
    return spb.SignRecordRequest(record_id=record_id, signer=signer)


def _code(stack: SigningStack, who: str, record_id: str) -> grpc.StatusCode:
    stub = spb_grpc.SigningServiceStub(stack.clients[who].channel)
    return code_of(stub.SignRecord, _request(record_id, who), timeout=TIMEOUT)


def _sign(stack: SigningStack, who: str, record_id: str) -> spb.SignatureInfo:
    stub = spb_grpc.SigningServiceStub(stack.clients[who].channel)
    info: spb.SignatureInfo = stub.SignRecord(_request(record_id, who), timeout=TIMEOUT)
    return info


def _sign_events(stack: SigningStack, who: str) -> list[aupb.AuditEvent]:
    return events(stack.clients["officer-s"], principal=who, action="signatures.sign")


def _stored(stack: SigningStack, record_id: str) -> int:
    """Signature rows of ``record_id``."""
    engine = engine_for(stack.database_url)
    try:
        with engine.connect() as c:
            return int(c.execute(
                sa.select(sa.func.count()).where(record_signatures.c.record_id == record_id)
            ).scalar_one())  # fmt: skip
    finally:
        engine.dispose()


def test_the_read_and_the_signature_commit_in_one_transaction(stack: SigningStack) -> None:
    """Under concurrent signings each read event sits just before its signature's event
    in the chain (they share a transaction); and a signature's event refused takes its
    read event with it: the call fails UNAVAILABLE, as a read whose event fails, and
    nothing is stored."""
    record_id = _record(stack, "dr-ec")
    with ThreadPoolExecutor(8) as pool:
        signed = list(pool.map(lambda _: _sign(stack, "dr-ec", record_id), range(8)))
    by_sequence = {e.sequence: e for e in _sign_events(stack, "dr-ec")}
    read = f"record/{record_id}/v1"
    for info in signed:
        (at,) = [s for s, e in by_sequence.items() if e.resource == f"signature/{info.id}"]
        before = by_sequence.get(at - 1)
        assert before is not None, "a signature's read event is not just before its own"
        assert before.resource == read, "a signature's read event is not just before its own"
    reads = [e for e in by_sequence.values() if e.resource == read]
    assert len(reads) == len(signed)
    engine = engine_for(stack.database_url)
    when = "NEW.action = 'signatures.sign' AND NEW.resource LIKE 'signature/%'"
    try:
        with audit_inserts_refused(stack.database_url, engine, when):
            code = _code(stack, "dr-ec", record_id)
    finally:
        engine.dispose()
    assert code == grpc.StatusCode.UNAVAILABLE, code.name
    assert _stored(stack, record_id) == len(signed)
    assert [e for e in _sign_events(stack, "dr-ec") if e.resource == read] == reads
    assert verify(stack.clients["officer-s"]).ok


def test_a_signature_row_in_conflict_leaves_its_read_event(stack: SigningStack) -> None:
    """The read event carries no change: when the signature row's insert conflicts (a
    database writer's trigger makes it), the read stays recorded, the signature's
    allowed event and row do not exist, and the caller's failure is audited after it."""
    record_id = _record(stack, "dr-ec")
    engine = engine_for(stack.database_url)
    try:
        with _signature_inserts_conflict(stack.database_url, engine):
            code = _code(stack, "dr-ec", record_id)
    finally:
        engine.dispose()
    assert code == grpc.StatusCode.FAILED_PRECONDITION, code.name
    assert _stored(stack, record_id) == 0
    found = _sign_events(stack, "dr-ec")
    (read,) = [e for e in found if e.resource == f"record/{record_id}/v1"]
    assert read.outcome == aupb.OUTCOME_ALLOWED
    after = [e for e in found if e.sequence > read.sequence]
    assert [e.outcome for e in after] == [aupb.OUTCOME_FAILED], "the failure is not audited"
    assert after[0].resource.startswith("signature/")
    assert after[0].status == code.name
    assert verify(stack.clients["officer-s"]).ok


def test_a_signing_failure_after_the_scope_check_commits_its_read_event(
    stack: SigningStack, keystore_pool: Pkcs11SessionPool
) -> None:
    """A signing that fails between the scope check and the signature's commit (here in
    the token: the signer's key destroyed once the server holds the signer) still
    commits its read event, before the failure's own event and the error."""
    record_id = _record(stack, "dr-gone")
    _sign(stack, "dr-gone", record_id)  # the server holds the signer (cached) from now
    with keystore_pool.session() as session:
        for obj in session.get_objects({Attribute.LABEL: signer_label("dr-gone")}):
            obj.destroy()
    keystore_pool.forget_keys()
    code = _code(stack, "dr-gone", record_id)
    assert code not in (grpc.StatusCode.OK, grpc.StatusCode.INTERNAL), code.name
    found = _sign_events(stack, "dr-gone")
    reads = [e for e in found if e.resource == f"record/{record_id}/v1"]
    assert [e.outcome for e in reads] == [aupb.OUTCOME_ALLOWED] * 2
    (failed,) = [e for e in found if e.outcome == aupb.OUTCOME_FAILED]
    assert failed.sequence > reads[1].sequence
    assert failed.status == code.name
    assert _stored(stack, record_id) == 1  # the first signature only


def test_a_denial_that_cannot_be_audited_fails_unavailable(stack: SigningStack) -> None:
    """The scope check's denial commits before the call is answered: refused by the
    trail, the call fails UNAVAILABLE, never an unaudited PERMISSION_DENIED."""
    record_id = _record(stack)  # dr-ec has no grant
    engine = engine_for(stack.database_url)
    try:
        with audit_inserts_refused(stack.database_url, engine, "NEW.outcome = 'denied'"):
            assert _code(stack, "dr-ec", record_id) == grpc.StatusCode.UNAVAILABLE
    finally:
        engine.dispose()
    assert _code(stack, "dr-ec", record_id) == grpc.StatusCode.PERMISSION_DENIED
    denied = [e for e in _sign_events(stack, "dr-ec") if record_id in e.resource]
    assert [e.outcome for e in denied] == [aupb.OUTCOME_DENIED]
    assert _stored(stack, record_id) == 0


# service.calls: a cancellation this close to the server's deadline is judged its expiry.
EXPIRY_TOLERANCE = 0.25


def test_a_call_judged_expired_stores_no_signature_though_its_commit_was_queued(
    stack: SigningStack,
) -> None:
    """A client that cancels within the tolerance of its deadline is judged to have
    reached it (audited ``failed``, DEADLINE_EXCEEDED). The signature's transaction,
    queued before and still waiting for a busy audit writer (held here), runs after
    that judgement: it must store nothing, only the read event, before the failure (the
    check inside its transaction, ``checked_when_run``). That the judgement stops the
    call's work before its own event waits for anything: test_call_expiry.

    On a loaded machine the signing may not have queued its transaction by the time the
    call is cancelled (then it expires before its read: one failure event, nothing
    stored, which is checked too); nothing outside the service shows that it has, so
    the scenario is tried again, up to ``ATTEMPTS`` times, until it happened once.
    """
    shapes: list[tuple[str, int, str]] = []
    for _ in range(ATTEMPTS):
        shapes = _expire_while_the_commit_waits(stack)
        if shapes != [("record", aupb.OUTCOME_FAILED, "DEADLINE_EXCEEDED")]:
            break  # the signing had queued its commit: the case under test
    assert shapes == [
        ("record", aupb.OUTCOME_ALLOWED, ""),
        ("signature", aupb.OUTCOME_FAILED, "DEADLINE_EXCEEDED"),
    ], shapes
    assert verify(stack.clients["officer-s"]).ok


ATTEMPTS = 4


def _expire_while_the_commit_waits(stack: SigningStack) -> list[tuple[str, int, str]]:
    """One try: the shapes of the events of a call cancelled at its deadline while the
    audit writer is held; whatever the timing, no signature may be stored."""
    record_id = _record(stack, "dr-ec")
    stub = spb_grpc.SigningServiceStub(stack.clients["dr-ec"].channel)
    deadline = 2.0  # SQLite: the writer's busy timeout (5 s) outlasts the hold
    before = max((e.sequence for e in _sign_events(stack, "dr-ec")), default=0)
    engine = engine_for(stack.database_url)
    try:
        with audit_writer_held(stack.database_url, engine):
            started = time.monotonic()
            call = stub.SignRecord.future(_request(record_id, "dr-ec"), timeout=deadline)
            wait_for(lambda: _worker_jobs(stack) == 1, 10, "the signing's worker")
            time.sleep(max(0.0, started + deadline - EXPIRY_TOLERANCE / 2 - time.monotonic()))
            call.cancel()
            # The server judges the call expired at once; its failure's event then waits
            # for the signing's job (service.calls._jobs_ended), which waits for the
            # writer: nothing to observe but time. Released a second later, the queued
            # transaction runs after the judgement, as a busy writer's would.
            time.sleep(1.0)
    finally:
        engine.dispose()
    wait_for(lambda: _worker_jobs(stack) == 0, 20, "the call's jobs to end")
    assert _stored(stack, record_id) == 0, "a signature was stored after its call's end"
    # The failure's event is written by a job submitted only once the signing's job has
    # ended: the count can read 0 between the two.
    found: list[aupb.AuditEvent] = []

    def audited() -> bool:
        found[:] = [e for e in _sign_events(stack, "dr-ec") if e.sequence > before]
        return len(found) >= 2

    with contextlib.suppress(AssertionError):  # one event: the caller judges the shapes
        wait_for(audited, 10, "the read's and the expiry's events")
    return [(e.resource.split("/")[0], e.outcome, e.status) for e in found]


def _worker_jobs(stack: SigningStack) -> float:
    """The server's jobs queued or running in worker threads (``medvault_worker_jobs``)."""
    url = f"http://127.0.0.1:{stack.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    found = re.search(r"^medvault_worker_jobs (\S+)$", text, re.MULTILINE)
    assert found, "medvault_worker_jobs not exported"
    return float(found.group(1))


def _signature_inserts_conflict(url: str, engine: sa.Engine) -> AbstractContextManager[None]:
    """Signature rows fail to insert as a constraint violation while the block runs."""
    return inserts_refused(
        url, engine, "record_signatures", "injected signature conflict", sqlstate="unique_violation"
    )
