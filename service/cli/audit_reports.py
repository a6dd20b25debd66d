"""The security officer's reports as pure functions over audit events.

Each takes the events a ``QueryEvents`` stream returned and keeps only counters, so a
report over a long period holds one entry per principal (or per principal, source and
action), never the events themselves.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from service._gen.medvault.v1 import audit_pb2 as pb

DISCLOSURE_ACTIONS = frozenset({"records.read", "records.stat", "records.list"})


def who(event: pb.AuditEvent) -> str:
    """``principal via application``, or the principal alone."""
    if event.application:
        return f"{event.principal} via {event.application}"
    return event.principal


def host_of(source: str) -> str:
    """The address of a gRPC peer without transport prefix and port.

    ``ipv4:10.0.0.7:51234`` -> ``10.0.0.7``; ``ipv6:[::1]:5000`` -> ``::1``. Each
    connection has its own port, so grouping by the full peer would split one host.
    """
    kind, sep, rest = source.partition(":")
    if not sep or kind not in ("ipv4", "ipv6"):
        return source
    if rest.startswith("["):
        return rest[1:].partition("]")[0]
    return rest.rpartition(":")[0] or rest


@dataclass(slots=True)
class DeniedGroup:
    """Denied calls of one principal, from one host, for one action."""

    principal: str
    source: str
    action: str
    count: int = 0
    statuses: set[str] = field(default_factory=set)
    last_seconds: int = 0


def denied_summary(events: Iterable[pb.AuditEvent]) -> list[DeniedGroup]:
    """Denied events grouped by (principal via app, host, action); most frequent first."""
    groups: dict[tuple[str, str, str], DeniedGroup] = {}
    for event in events:
        if event.outcome != pb.OUTCOME_DENIED:
            continue
        key = (who(event), host_of(event.source), event.action)
        group = groups.get(key)
        if group is None:
            group = groups[key] = DeniedGroup(*key)
        group.count += 1
        if event.status:
            group.statuses.add(event.status)
        group.last_seconds = max(group.last_seconds, event.time.seconds)
    return sorted(groups.values(), key=lambda g: (-g.count, g.principal, g.source, g.action))


@dataclass(slots=True)
class ReaderCount:
    """Allowed reads by one principal: how many, of how many patients, the last when."""

    principal: str
    reads: int = 0
    patients: set[str] = field(default_factory=set)
    last_seconds: int = 0


def top_readers(events: Iterable[pb.AuditEvent], limit: int = 10) -> list[ReaderCount]:
    """The ``limit`` principals with the most allowed ``records.read`` events."""
    counts: defaultdict[str, ReaderCount] = defaultdict(lambda: ReaderCount(""))
    for event in events:
        if event.action != "records.read" or event.outcome != pb.OUTCOME_ALLOWED:
            continue
        reader = counts[event.principal]
        reader.principal = event.principal
        reader.reads += 1
        if event.patient_index:
            reader.patients.add(event.patient_index)
        reader.last_seconds = max(reader.last_seconds, event.time.seconds)
    ranked = sorted(counts.values(), key=lambda r: (-r.reads, r.principal))
    return ranked[:limit]


def disclosures(events: Iterable[pb.AuditEvent]) -> Iterable[pb.AuditEvent]:
    """The allowed reads, stats and listings among ``events``, in stream order."""
    return (
        e for e in events if e.action in DISCLOSURE_ACTIONS and e.outcome == pb.OUTCOME_ALLOWED
    )
