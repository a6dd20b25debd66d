"""Walk the audit chain and its checkpoints; name the first bad sequence and why.

Reads events in batches in sequence order, so memory stays bounded however long the
trail (checkpoints are held in full: one per N events). Each event must

* carry the next sequence number (a gap: "event missing (deleted)");
* hash correctly: SHA-256(prev_hash || canonical) equals its stored ``hash``. When it
  does not, the verifier tries nearby sequence numbers: if the row's content hashes
  correctly at an *earlier* position, events were inserted before it (first bad = that
  earlier position); at a *later* position, events were reordered or deleted and
  renumbered; at none, the row itself was altered;
* link to its predecessor: its ``prev_hash`` equals the previous event's ``hash``
  (else the previous event was altered and re-hashed, or this one was forged);
* match any checkpoint at its sequence: the signature verifies, the hashes agree and a
  version 2 checkpoint names the previous checkpoint (sequence and digest): a checkpoint
  deleted from between two others is named by its successor;
* match every witnessed checkpoint at its sequence (:mod:`storage.audit_witness`): a
  witness that disagrees, once its signature verifies under the audit key, means the
  events after the previous good checkpoint were rewritten (re-hashing cannot help: the
  witness is outside the database); a witnessed checkpoint absent from the database
  was deleted. A witness entry whose signature fails is reported as witness tampering.

A malformed row (``storage.audit_rows``) is never an error while reading: a checkpoint
row is reported as ``checkpoint altered`` with the names of its bad fields, at its
sequence (or, when the sequence itself is unreadable, just after the previous readable
checkpoint: the events from there on are no longer covered by a readable signature); a
malformed head row is reported before the walk, at its sequence when that is readable.

Truncation is caught through the head row (read before the walk) and through
checkpoints: either naming a sequence past the last event means events were deleted.
An event past the head read *after* the walk was written outside the audit writer.

``verify_since`` runs the same walk from a checkpoint the service itself witnessed: the
trail calls it before signing, and refuses to sign a head it cannot reach from there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from storage.audit_model import (
    GENESIS_HASH,
    ChainedEvent,
    Checkpoint,
    VerifyResult,
    chain_hash,
    checkpoint_digest,
)
from storage.audit_rows import AuditHeadMalformedError
from storage.audit_witness import CheckpointWitness, WitnessedSet, WitnessError, gather

BATCH_SIZE: Final = 1000
# How far from its stored position a row's content is searched for (insert/reorder).
DISPLACEMENT_WINDOW: Final = 64

MISSING = "event missing (deleted)"
ALTERED = "event altered"
INSERTED = "event inserted (later events shifted)"
REORDERED = "event out of place (events reordered, or deleted and renumbered)"
LINK_BROKEN = "chain link broken (previous event altered and re-hashed, or this event forged)"
SIGNATURE_INVALID = "checkpoint signature invalid"
CHECKPOINT_MISMATCH = "checkpoint does not match chain"
TRUNCATED = "trail truncated"
HEAD_MISMATCH = "head row does not match chain"
BEYOND_HEAD = "event beyond the head (written outside the audit writer)"
CHECKPOINT_DELETED = "checkpoint missing (deleted; a later checkpoint names it)"
CHECKPOINT_CHAIN_BROKEN = "checkpoint does not name the previous checkpoint"
WITNESS_MISMATCH = (
    "witnessed checkpoint does not match chain (events after the previous good checkpoint "
    "rewritten and re-hashed)"
)
WITNESS_MISSING = "witnessed checkpoint missing from the database (deleted)"
WITNESS_FORGED = "witness entry not signed by the audit key (witness tampered)"
WITNESS_UNAVAILABLE = "witness unavailable: the chain was not compared with its checkpoints"
ANCHOR_MISMATCH = "chain does not match the checkpoint this service witnessed"
CHECKPOINT_ALTERED = "checkpoint altered"
HEAD_ALTERED = "head row altered"


class AuditEventSource(Protocol):
    """What verification reads: the head, the checkpoints, events in order."""

    def head(self) -> tuple[int, bytes]:
        """Sequence and hash of the last committed event."""
        ...

    def checkpoints(self, after_sequence: int = 0) -> list[Checkpoint]:
        """Checkpoints past ``after_sequence``, oldest first."""
        ...

    def events(self, after_sequence: int = 0, limit: int = ...) -> list[ChainedEvent]:
        """Events after ``after_sequence`` in sequence order."""
        ...


Problem = tuple[int, str]


def malformed_checkpoint(checkpoint: Checkpoint, where: int | None = None) -> Problem | None:
    """The problem of a checkpoint read from a malformed row (names fields, no values)."""
    if not checkpoint.malformed:
        return None
    fields = ", ".join(checkpoint.malformed)
    return (
        checkpoint.sequence if where is None else where
    ), f"{CHECKPOINT_ALTERED}: {fields} malformed"


def malformed_head(error: AuditHeadMalformedError) -> Problem:
    """The problem of a malformed head row: at its sequence when readable, else 0."""
    return error.sequence or 0, f"{HEAD_ALTERED}: {', '.join(error.fields)} malformed"


def by_sequence(checkpoints: Sequence[Checkpoint], after: int = 0) -> dict[int, Checkpoint]:
    """Checkpoints (in the database's order) by the sequence where the walk meets them.

    A checkpoint whose sequence is unreadable is placed just after the previous one:
    the events from there on are not covered by a readable checkpoint. A malformed
    checkpoint is never hidden behind a readable one at the same place.
    """
    placed: dict[int, Checkpoint] = {}
    previous = after
    for checkpoint in checkpoints:
        at = previous + 1 if "sequence" in checkpoint.malformed else checkpoint.sequence
        if checkpoint.malformed or at not in placed:
            placed[at] = checkpoint
        previous = at
    return placed


@dataclass
class _Walk:
    """State of the walk: where the chain is, what it has checked."""

    checkpoints: dict[int, Checkpoint]
    verify_signature: Callable[[Checkpoint], bool]
    head_sequence: int
    expected: int = 1
    prev: bytes = field(default=bytes(32))
    events_checked: int = 0
    checkpoints_checked: int = 0
    previous_checkpoint: int = 0
    hash_at_head: bytes | None = None
    last_checkpoint: Checkpoint | None = None  # the previous checkpoint in the database
    witnessed: WitnessedSet | None = None

    def step(self, event: ChainedEvent) -> Problem | None:
        """Check one event (and its checkpoint); return the problem, if any."""
        s = self.expected
        problem = self._check_row(event)
        if problem is not None:
            return problem
        checkpoint = self.checkpoints.get(s)
        if checkpoint is not None:
            problem = self._check_checkpoint(checkpoint, event)
            if problem is not None:
                return problem
        if self.witnessed is not None:
            problem = self._check_witnessed(self.witnessed, event, checkpoint is not None)
            if problem is not None:
                return problem
        if s == self.head_sequence:
            self.hash_at_head = event.hash
        self.prev = event.hash
        self.expected += 1
        self.events_checked += 1
        return None

    def _check_row(self, event: ChainedEvent) -> Problem | None:
        """The event's own place, fields, hash and link to its predecessor."""
        s = self.expected
        if "sequence" in event.malformed:  # the row's place is unknown: named where met
            return s, ALTERED
        if event.sequence != s:
            return s, MISSING
        if event.malformed:  # a field no writer stores: nothing to hash
            return s, ALTERED
        if not _hashes_at(event, s):
            return _displaced(event)
        if event.prev_hash != self.prev:
            return max(s - 1, 1), LINK_BROKEN
        return None

    def _check_checkpoint(self, checkpoint: Checkpoint, event: ChainedEvent) -> Problem | None:
        self.checkpoints_checked += 1
        problem = malformed_checkpoint(checkpoint, event.sequence)
        if problem is not None:
            return problem
        if not self.verify_signature(checkpoint):
            return checkpoint.sequence, SIGNATURE_INVALID
        if checkpoint.hash != event.hash:
            # The chain from here back is self-consistent but not what was signed:
            # everything after the previous checkpoint may have been rewritten.
            return self.previous_checkpoint + 1, CHECKPOINT_MISMATCH
        problem = self._check_link(checkpoint)
        if problem is not None:
            return problem
        self.previous_checkpoint = checkpoint.sequence
        self.last_checkpoint = checkpoint
        return None

    def _check_link(self, checkpoint: Checkpoint) -> Problem | None:
        """A version 2 checkpoint must name the previous checkpoint of the database."""
        if checkpoint.version < 2:
            return None
        previous = self.last_checkpoint
        expected = previous.sequence if previous is not None else 0
        if checkpoint.prev_sequence > expected:
            return checkpoint.prev_sequence, CHECKPOINT_DELETED
        digest = checkpoint_digest(previous) if previous is not None else GENESIS_HASH
        if checkpoint.prev_sequence != expected or checkpoint.prev_digest != digest:
            return checkpoint.sequence, CHECKPOINT_CHAIN_BROKEN
        return None

    def _check_witnessed(
        self, witnessed: WitnessedSet, event: ChainedEvent, in_database: bool
    ) -> Problem | None:
        """Every witness claim at this sequence must agree with the chain and the database."""
        s = event.sequence
        for claim in witnessed.at(s):
            if claim.hash == event.hash and in_database:
                continue  # agrees with a checkpoint already checked: nothing to trust
            if not witnessed.genuine(claim):
                return s, WITNESS_FORGED
            if claim.hash != event.hash:
                return self.previous_checkpoint + 1, WITNESS_MISMATCH
            return s, WITNESS_MISSING
        return None

    def finish(self, head: tuple[int, bytes], head_after: tuple[int, bytes]) -> Problem | None:
        """After the last event: truncation, head consistency, rows past the head."""
        last = self.expected - 1
        beyond = sorted(c for c in self.checkpoints if c > last)
        for at in beyond:  # a malformed one is named as such, not as a truncation
            problem = malformed_checkpoint(self.checkpoints[at], at)
            if problem is not None:
                return problem
        if self.witnessed is not None:
            for claim in self.witnessed.beyond(last):
                if not self.witnessed.genuine(claim):
                    return claim.sequence, WITNESS_FORGED
                beyond.append(claim.sequence)
        if beyond or head[0] > last:
            return last + 1, TRUNCATED
        if head[0] > 0 and self.hash_at_head != head[1]:
            return head[0], HEAD_MISMATCH
        if head_after[0] < last:
            return head_after[0] + 1, BEYOND_HEAD
        return None


def _hashes_at(event: ChainedEvent, sequence: int) -> bool:
    """Whether ``event``'s content hashes to its stored hash at ``sequence``.

    A field no writer produces (a BLOB in a text column, which SQLite keeps as bytes)
    has no canonical encoding: the row was altered, and verification names it rather
    than failing with the encoder's error.
    """
    try:
        return chain_hash(event.prev_hash, sequence, event.entry) == event.hash
    except (TypeError, ValueError):
        return False


def _displaced(event: ChainedEvent) -> Problem:
    """Where a row whose hash fails belongs: earlier (insert), later (reorder), nowhere."""
    s = event.sequence
    for distance in range(1, DISPLACEMENT_WINDOW + 1):
        for candidate in (s - distance, s + distance):
            if candidate >= 1 and _hashes_at(event, candidate):
                return (candidate, INSERTED) if candidate < s else (s, REORDERED)
    return s, ALTERED


def verify_chain(
    log: AuditEventSource,
    verify_signature: Callable[[Checkpoint], bool],
    *,
    batch_size: int = BATCH_SIZE,
    witnesses: Sequence[CheckpointWitness] = (),
) -> VerifyResult:
    """Walk every event and checkpoint of ``log`` against ``witnesses``; stop at the first problem.

    A witness that cannot be read fails verification (the database alone cannot show a
    full re-hash), unless the database walk finds a problem first.
    """
    # The head is read first: every event at or below it was committed before the walk,
    # so a head past the last event walked means events were deleted.
    try:
        head = log.head()
    except AuditHeadMalformedError as e:
        return _result(_Walk({}, verify_signature, head_sequence=0), malformed_head(e))
    checkpoints = by_sequence(log.checkpoints())
    walk = _Walk(checkpoints, verify_signature, head_sequence=head[0])
    unavailable: WitnessError | None = None
    if witnesses:
        try:
            walk.witnessed = gather(witnesses, verify_signature)
        except WitnessError as e:
            unavailable = e
    try:
        problem = _walk(log, walk, 0, batch_size) or walk.finish(head, log.head())
    except WitnessError:  # a witness failed while a claim was being checked
        return _result(walk, (0, WITNESS_UNAVAILABLE))
    except AuditHeadMalformedError as e:  # changed during the walk
        return _result(walk, malformed_head(e))
    if problem is None and unavailable is not None:
        problem = (0, WITNESS_UNAVAILABLE)
    return _result(walk, problem)


def verify_since(
    log: AuditEventSource,
    anchor: Checkpoint,
    verify_signature: Callable[[Checkpoint], bool],
    *,
    batch_size: int = BATCH_SIZE,
) -> Problem | None:
    """Check the chain from ``anchor`` (a checkpoint known good) up to the head.

    The anchor must still be in the database, unchanged, and every event and
    checkpoint after it must chain from it: what the trail checks before it signs.
    """
    try:
        return _verify_since(log, anchor, verify_signature, batch_size)
    except AuditHeadMalformedError as e:
        return malformed_head(e)


def _verify_since(
    log: AuditEventSource,
    anchor: Checkpoint,
    verify_signature: Callable[[Checkpoint], bool],
    batch_size: int,
) -> Problem | None:
    head = log.head()
    checkpoints = by_sequence(log.checkpoints(anchor.sequence - 1), anchor.sequence - 1)
    stored = checkpoints.pop(anchor.sequence, None)
    if stored is None:
        return anchor.sequence, WITNESS_MISSING
    if stored.malformed:
        return malformed_checkpoint(stored, anchor.sequence)
    at_anchor = log.events(anchor.sequence - 1, 1)
    if stored.hash != anchor.hash or not at_anchor or at_anchor[0].hash != anchor.hash:
        return anchor.sequence, ANCHOR_MISMATCH
    walk = _Walk(
        checkpoints, verify_signature, head_sequence=head[0], expected=anchor.sequence + 1,
        prev=anchor.hash, previous_checkpoint=anchor.sequence, last_checkpoint=stored,
        hash_at_head=anchor.hash if head[0] == anchor.sequence else None,
    )  # fmt: skip
    return _walk(log, walk, anchor.sequence, batch_size) or walk.finish(head, log.head())


def _walk(log: AuditEventSource, walk: _Walk, after: int, batch_size: int) -> Problem | None:
    """Feed ``walk`` every event after ``after``, batch by batch; the first problem."""
    while True:
        batch = log.events(after, batch_size)
        for event in batch:
            problem = walk.step(event)
            if problem is not None:
                return problem
        if len(batch) < batch_size:
            return None
        after = batch[-1].sequence


def _result(walk: _Walk, problem: Problem | None) -> VerifyResult:
    last_checkpoint = max(walk.checkpoints) if walk.checkpoints else None
    if problem is None:
        agreed = walk.witnessed.describe() if walk.witnessed is not None else ""
        return VerifyResult(
            ok=True,
            events_checked=walk.events_checked,
            checkpoints_checked=walk.checkpoints_checked,
            first_bad_sequence=None,
            reason=f"chain intact; {agreed}" if agreed else "chain intact",
            last_checkpoint_sequence=last_checkpoint,
        )
    return VerifyResult(
        ok=False,
        events_checked=walk.events_checked,
        checkpoints_checked=walk.checkpoints_checked,
        first_bad_sequence=problem[0] or None,
        reason=problem[1],
        last_checkpoint_sequence=last_checkpoint,
    )
