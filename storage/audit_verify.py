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
* match any checkpoint at its sequence: the signature verifies and the hashes agree.

Truncation is caught through the head row (read before the walk) and through
checkpoints: either naming a sequence past the last event means events were deleted.
An event past the head read *after* the walk was written outside the audit writer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from storage.audit_model import ChainedEvent, Checkpoint, VerifyResult, chain_hash

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


class AuditEventSource(Protocol):
    """What verification reads: the head, the checkpoints, events in order."""

    def head(self) -> tuple[int, bytes]:
        """Sequence and hash of the last committed event."""
        ...

    def checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint, oldest first."""
        ...

    def events(self, after_sequence: int = 0, limit: int = ...) -> list[ChainedEvent]:
        """Events after ``after_sequence`` in sequence order."""
        ...


Problem = tuple[int, str]


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

    def step(self, event: ChainedEvent) -> Problem | None:
        """Check one event (and its checkpoint); return the problem, if any."""
        s = self.expected
        if event.sequence != s:
            return s, MISSING
        if chain_hash(event.prev_hash, s, event.entry) != event.hash:
            return _displaced(event)
        if event.prev_hash != self.prev:
            return max(s - 1, 1), LINK_BROKEN
        checkpoint = self.checkpoints.get(s)
        if checkpoint is not None:
            problem = self._check_checkpoint(checkpoint, event)
            if problem is not None:
                return problem
        if s == self.head_sequence:
            self.hash_at_head = event.hash
        self.prev = event.hash
        self.expected += 1
        self.events_checked += 1
        return None

    def _check_checkpoint(self, checkpoint: Checkpoint, event: ChainedEvent) -> Problem | None:
        self.checkpoints_checked += 1
        if not self.verify_signature(checkpoint):
            return checkpoint.sequence, SIGNATURE_INVALID
        if checkpoint.hash != event.hash:
            # The chain from here back is self-consistent but not what was signed:
            # everything after the previous checkpoint may have been rewritten.
            return self.previous_checkpoint + 1, CHECKPOINT_MISMATCH
        self.previous_checkpoint = checkpoint.sequence
        return None

    def finish(self, head: tuple[int, bytes], head_after: tuple[int, bytes]) -> Problem | None:
        """After the last event: truncation, head consistency, rows past the head."""
        last = self.expected - 1
        beyond = [c for c in self.checkpoints if c > last]
        if beyond or head[0] > last:
            return last + 1, TRUNCATED
        if head[0] > 0 and self.hash_at_head != head[1]:
            return head[0], HEAD_MISMATCH
        if head_after[0] < last:
            return head_after[0] + 1, BEYOND_HEAD
        return None


def _displaced(event: ChainedEvent) -> Problem:
    """Where a row whose hash fails belongs: earlier (insert), later (reorder), nowhere."""
    s = event.sequence
    for distance in range(1, DISPLACEMENT_WINDOW + 1):
        for candidate in (s - distance, s + distance):
            if candidate >= 1 and chain_hash(event.prev_hash, candidate, event.entry) == event.hash:
                return (candidate, INSERTED) if candidate < s else (s, REORDERED)
    return s, ALTERED


def verify_chain(
    log: AuditEventSource,
    verify_signature: Callable[[Checkpoint], bool],
    *,
    batch_size: int = BATCH_SIZE,
) -> VerifyResult:
    """Walk every event and checkpoint of ``log``; the first problem ends the walk."""
    # The head is read first: every event at or below it was committed before the walk,
    # so a head past the last event walked means events were deleted.
    head = log.head()
    checkpoints = {c.sequence: c for c in log.checkpoints()}
    walk = _Walk(checkpoints, verify_signature, head_sequence=head[0])
    after = 0
    while True:
        batch = log.events(after, batch_size)
        for event in batch:
            problem = walk.step(event)
            if problem is not None:
                return _result(walk, problem)
        if len(batch) < batch_size:
            break
        after = batch[-1].sequence
    return _result(walk, walk.finish(head, log.head()))


def _result(walk: _Walk, problem: Problem | None) -> VerifyResult:
    last_checkpoint = max(walk.checkpoints) if walk.checkpoints else None
    if problem is None:
        return VerifyResult(
            ok=True,
            events_checked=walk.events_checked,
            checkpoints_checked=walk.checkpoints_checked,
            first_bad_sequence=None,
            reason="chain intact",
            last_checkpoint_sequence=last_checkpoint,
        )
    return VerifyResult(
        ok=False,
        events_checked=walk.events_checked,
        checkpoints_checked=walk.checkpoints_checked,
        first_bad_sequence=problem[0],
        reason=problem[1],
        last_checkpoint_sequence=last_checkpoint,
    )
