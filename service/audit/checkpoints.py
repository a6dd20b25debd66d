"""Making and checking audit checkpoint signatures.

New checkpoints are version 2: each signs its predecessor's sequence and digest, so the
checkpoints form a chain (``storage.audit_model``). Version 1 checkpoints (written
before) still verify.

Checking uses only ``cryptography`` and the public key stored with the checkpoint, and
also requires that key to be the trusted one: a checkpoint an attacker signed with a
key of their own carries a valid signature, so the key itself must be pinned.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Final, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from prometheus_client import Counter

from keystore import Signer
from service.audit import AuditChainError
from service.incidents import incident_entry, signal
from storage import (
    GENESIS_HASH,
    SIGNATURE_INVALID,
    AuditHeadMalformedError,
    AuditLog,
    Checkpoint,
    CheckpointWitness,
    Problem,
    VerifyResult,
    WitnessError,
    checkpoint_digest,
    checkpoint_message_v2,
    gather,
    malformed_checkpoint,
    malformed_head,
    signed_message,
    verify_chain,
    verify_since,
)

logger = logging.getLogger(__name__)
CHAIN_INCIDENT: Final = "audit-chain"
TAIL_CHANGED: Final = (
    "event committed by this service changed or removed (the unsigned tail was rewritten)"
)
# Checkpoints kept for a witness that is down; older ones are dropped (still in the DB).
MAX_PENDING: Final = 10_000
WITNESS_FAILURES = Counter(
    "medvault_audit_witness_failures", "Checkpoint copies a witness failed to store"
)


def make_checkpoint(
    signer: Signer,
    sequence: int,
    head_hash: bytes,
    created_at: datetime,
    previous: Checkpoint | None = None,
) -> Checkpoint:
    """Sign (sequence, hash, previous checkpoint) with ``signer``: a version 2 checkpoint."""
    prev_sequence = previous.sequence if previous is not None else 0
    prev_digest = checkpoint_digest(previous) if previous is not None else GENESIS_HASH
    signature = signer.sign(checkpoint_message_v2(sequence, head_hash, prev_sequence, prev_digest))
    return Checkpoint(
        sequence=sequence,
        hash=head_hash,
        signature=signature,
        key_label=signer.key_label,
        public_key_der=signer.public_key_der(),
        created_at=created_at,
        version=2,
        prev_sequence=prev_sequence,
        prev_digest=prev_digest,
    )


def signature_valid(checkpoint: Checkpoint) -> bool:
    """Whether the checkpoint's signature verifies under its own stored public key."""
    message = signed_message(checkpoint)
    try:
        public = serialization.load_der_public_key(checkpoint.public_key_der)
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(checkpoint.signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(checkpoint.signature, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def signature_checker(trusted_public_key_der: bytes | None) -> Callable[[Checkpoint], bool]:
    """A checker accepting only checkpoints signed by the trusted key.

    With no trusted key every checkpoint fails: unverifiable is not verified.
    """

    def check(checkpoint: Checkpoint) -> bool:
        if trusted_public_key_der is None:
            return False
        if checkpoint.public_key_der != trusted_public_key_der:
            return False
        return signature_valid(checkpoint)

    return check


class Checkpointer:
    """Signs checkpoints only over a chain that reaches them from one it witnessed.

    The anchor is the last checkpoint this process signed, else the newest one a
    witness holds (read back once), else, on a first start with no witness, the
    database's newest checkpoint with a valid signature (trust on first use). Before
    signing, ``verify_since`` walks from the anchor to the head; if that fails the
    checkpoint is refused (``AuditChainError``), an ``audit-chain`` incident is raised
    and ``verify`` reports the refusal.

    The walk cannot see a rewrite of the unsigned tail (events after the anchor,
    re-hashed with the head): it is self-consistent. So the trail also tells the
    checkpointer the last event it committed itself (``note_committed``), and a head from
    which that event is gone or changed is refused the same way. Events of another
    replica after it, or written before this process started, are not covered.

    Each stored checkpoint is then written to every witness. A witness that fails is
    logged and counted, and the checkpoint is kept in memory and written again at the
    next attempt: the trail (and every read waiting on it) never fails because a
    witness is down. Copies still pending when the process stops are not lost: at its
    first checkpoint attempt a new process catches each witness up (``_catch_up``): it
    reads the newest genuine checkpoint the witness holds, verifies the chain from it
    to the head (as before signing) and copies every newer checkpoint of the database.
    A witness it cannot read is tried again at the next attempt.
    """

    def __init__(
        self,
        log: AuditLog,
        signer: Signer,
        witnesses: Sequence[CheckpointWitness] = (),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._log = log
        self._signer = signer
        self._witnesses = tuple(witnesses)
        self._clock = clock
        self._lock = threading.Lock()
        self._anchor: Checkpoint | None = None
        self._read_back = False
        self._pending: list[tuple[CheckpointWitness, Checkpoint]] = []
        self._refusal: Problem | None = None
        # Witnesses (by position) this process has caught up with the database.
        self._caught_up: set[int] = set()
        self._committed: tuple[int, bytes] | None = None  # (sequence, hash) we wrote last

    def note_committed(self, sequence: int, event_hash: bytes) -> None:
        """Remember an event this process committed; the next checkpoint must contain it."""
        with self._lock:
            if self._committed is None or sequence > self._committed[0]:
                self._committed = (sequence, event_hash)

    def checker(self) -> Callable[[Checkpoint], bool]:
        """The signature check pinned to the token's current audit key."""
        return signature_checker(self._signer.public_key_der())

    def checkpoint(self) -> Checkpoint | None:
        """Sign the head if it is new and reachable from the anchor; None if nothing new."""
        with self._lock:
            self._catch_up()  # first: it reads what the witness held before this process
            self._retry_pending()
            try:
                sequence, head_hash = self._log.head()
            except AuditHeadMalformedError as e:
                self._refuse(malformed_head(e))  # never sign a head it cannot read
            last = self._log.last_checkpoint()
            problem = malformed_checkpoint(last) if last is not None else None
            if problem is not None:
                self._refuse(problem)  # nor link a new checkpoint to a placeholder
            if sequence == 0 or (last is not None and last.sequence >= sequence):
                return None
            problem = self._check_chain(last) or self._check_committed()
            if problem is not None:
                self._refuse(problem)
            made = make_checkpoint(self._signer, sequence, head_hash, self._clock(), last)
            if not self._log.add_checkpoint(made):
                return None  # another replica checkpointed first; its copy is witnessed there
            self._anchor, self._refusal = made, None
            for witness in self._witnesses:
                self._witness(witness, made)
            return made

    def verify(self) -> VerifyResult:
        """The full verification against the witnesses, and any refusal to sign."""
        result = verify_chain(self._log, self.checker(), witnesses=self._witnesses)
        refusal = self._still_refused()
        if result.ok and refusal is not None:
            return replace(
                result, ok=False, first_bad_sequence=refusal[0],
                reason=f"checkpoint refused by the service: {refusal[1]}",
            )  # fmt: skip
        return result

    def _still_refused(self) -> Problem | None:
        """The last refusal, unless the chain reaches the anchor again (it was repaired)."""
        with self._lock:
            anchor = self._anchor
            if self._refusal is not None and anchor is not None:
                repaired = (
                    verify_since(self._log, anchor, self.checker()) is None
                    and self._check_committed() is None
                )
                if repaired:
                    self._refusal = None
            return self._refusal

    def _check_chain(self, last: Checkpoint | None) -> Problem | None:
        checker = self.checker()
        anchor = self._anchor or self._witnessed_anchor(checker)
        if anchor is None:
            if last is None:
                return None  # the very first checkpoint: nothing to reach it from
            if not checker(last):
                return last.sequence, SIGNATURE_INVALID
            anchor = last
        self._anchor = anchor  # kept, so that a repaired chain can be recognised
        return verify_since(self._log, anchor, checker)

    def _check_committed(self) -> Problem | None:
        """The last event this process committed must still be in the chain, unchanged."""
        if self._committed is None:
            return None
        sequence, event_hash = self._committed
        found = self._log.events(sequence - 1, 1)
        if not found or found[0].sequence != sequence or found[0].hash != event_hash:
            return sequence, TAIL_CHANGED
        return None

    def _witnessed_anchor(self, checker: Callable[[Checkpoint], bool]) -> Checkpoint | None:
        """The newest witnessed checkpoint, read back once per process."""
        if self._read_back or not self._witnesses:
            return None
        try:
            anchor = gather(self._witnesses, checker).latest_genuine()
        except WitnessError as e:
            logger.warning("audit witness unreadable", extra={"error": type(e).__name__})
            return None
        self._read_back = True
        return anchor

    def _refuse(self, problem: Problem) -> NoReturn:
        first = problem != self._refusal
        self._refusal = problem
        if first:  # once per finding, not at every attempt
            description = f"refused to sign a checkpoint: {problem[1]} at sequence {problem[0]}"
            signal(CHAIN_INCIDENT, "audit-trail")
            # Appended directly: this runs on the trail's writer thread, where record()
            # would wait for itself.
            try:
                self._log.append([incident_entry(CHAIN_INCIDENT, "medvault", "", description)])
            except Exception as e:  # noqa: BLE001  (the log line and metric still report it)
                logger.error("could not audit an incident", extra={"error": type(e).__name__})  # noqa: TRY400
        raise AuditChainError(f"audit chain broken at sequence {problem[0]}: {problem[1]}")

    def _witness(self, witness: CheckpointWitness, checkpoint: Checkpoint) -> None:
        try:
            witness.put(checkpoint)
        except WitnessError as e:
            WITNESS_FAILURES.inc()
            logger.warning(
                "audit checkpoint not witnessed; retried at the next checkpoint",
                extra={"witness": witness.describe(), "sequence": checkpoint.sequence,
                       "error": type(e.__cause__ or e).__name__},
            )  # fmt: skip
            self._pending.append((witness, checkpoint))
            del self._pending[:-MAX_PENDING]

    def _catch_up(self) -> None:
        """Once per process and witness: copy the checkpoints it misses (e.g. the copies
        pending when the previous process stopped), if the chain reaches them."""
        for n, witness in enumerate(self._witnesses):
            if n in self._caught_up:
                continue
            checker = self.checker()
            try:
                newest = gather([witness], checker).latest_genuine()
            except WitnessError as e:
                logger.warning(
                    "audit witness unreadable; catching up at the next checkpoint",
                    extra={"witness": witness.describe(), "error": type(e).__name__},
                )  # fmt: skip
                continue
            self._caught_up.add(n)
            if newest is None:
                continue  # an empty witness starts with the next checkpoint
            missing = self._log.checkpoints(newest.sequence)
            if not missing:
                continue
            problem = verify_since(self._log, newest, checker)
            if problem is not None:
                # Not copied: signing refuses this chain too, and raises the incident.
                logger.warning(
                    "audit checkpoints not copied to a witness: the chain does not reach "
                    "them from its newest copy",
                    extra={"witness": witness.describe(), "sequence": problem[0]},
                )  # fmt: skip
                continue
            # Copied now (or queued again by _witness if this fails).
            self._pending = [
                (w, c) for w, c in self._pending
                if w is not witness or c.sequence <= newest.sequence
            ]  # fmt: skip
            for checkpoint in missing:
                self._witness(witness, checkpoint)

    def _retry_pending(self) -> None:
        pending, self._pending = self._pending, []
        for witness, checkpoint in pending:
            self._witness(witness, checkpoint)
