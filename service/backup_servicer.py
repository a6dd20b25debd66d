"""BackupService: run, list, verify, drill and prune backups, and export the public key
that signs their manifests (the ``backup_operator`` role). ``medvault backup`` and
``medvault restore-drill`` are clients of this service, with the operator's certificate.

Backups are ciphertext and this role never holds ``records.read``: nothing here returns
record content. Long calls stream ``Progress`` messages, then their result. The work
runs in a worker thread; its progress callback hands reports to the event loop, at most
one every ``PROGRESS_INTERVAL`` seconds per phase (a large store copies many thousands
of objects), and always the last one of a phase.

Audit: each allowed call writes one event when it starts and one when it ends (with
the backup id and the outcome), like a rewrap; the resource is ``backup/<id>``, or
``backup`` before an id exists. A verify or drill of an id with no complete backup is
refused (NOT_FOUND, audited as failed) before anything is read, restored or written.
A client that goes away stops a verify or a drill at its next progress report; a backup
it started runs to completion (a backup begun is worth finishing, and an interrupted one
would be resumed by the next run anyway).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Generic, TypeVar

from grpc import aio

from service._gen.medvault.v1 import backup_pb2 as bpb
from service._gen.medvault.v1 import backup_pb2_grpc as bpb_grpc
from service.backup import Backups, RetentionPolicy, report_kind
from service.backup.drill import sample_plan
from service.calls import CallState, entered, handled
from service.convert_audit import timestamp
from service.guard import AccessGuard, Call
from storage import (
    ALGORITHM,
    DEFAULT_GRACE,
    BackupProgress,
    BackupResult,
    BackupSummary,
    DrillReport,
    InvalidRecordError,
    Outcome,
    RestoreFailure,
    StorageError,
    VerifyReport,
    canonical_json,
    check_backup_id,
)

log = logging.getLogger(__name__)
PROGRESS_INTERVAL = 0.25
# A retention rule beyond this many periods is a typo, not a policy.
MAX_KEEP = 10_000
# A grace beyond ten years is a typo too (and a double can overflow a timedelta).
MAX_GRACE_HOURS = 24 * 366 * 10
R = TypeVar("R")
# What a call's closing event says about its result: (resource, outcome, reason).
Ending = Callable[[R], tuple[str, Outcome, str]]


class ClientGoneError(StorageError):
    """The caller cancelled; raised inside the worker at its next progress report."""


def summary_pb(s: BackupSummary) -> bpb.BackupSummary:
    """The proto of one complete backup."""
    return bpb.BackupSummary(
        id=s.id, created_at=timestamp(s.created_at), completed_at=timestamp(s.completed_at),
        records=s.records, objects=s.objects, bytes=s.bytes,
        objects_copied=s.copied_objects, bytes_copied=s.copied_bytes, trigger=s.trigger,
    )  # fmt: skip


def verify_pb(report: VerifyReport) -> bpb.VerifyReport:
    """The proto of a verification report; each failure names its object."""
    return bpb.VerifyReport(
        id=report.backup_id, ok=report.ok, manifest_signature_valid=report.signature_ok,
        objects_checked=report.objects_checked, bytes_checked=report.bytes_read,
        failures=[f"{f.key}: {f.problem}" for f in report.failures], seconds=report.seconds,
        bytes_per_second=report.bytes_per_second, objects_per_second=report.objects_per_second,
    )  # fmt: skip


def drill_pb(report: DrillReport) -> bpb.DrillReport:
    """The proto of a drill report; ``report_json`` is the signed document as stored."""
    doc = report.document
    rate = doc.get("throughput", {})
    sample = doc.get("sample", {})
    return bpb.DrillReport(
        backup_id=report.backup_id, ok=report.ok, recovery_seconds=report.recovery_seconds,
        records_verified=report.records_verified, bytes_verified=report.bytes_verified,
        signatures_verified=int(doc.get("verified", {}).get("signatures", 0)),
        audit_chain_ok=bool(doc.get("audit_chain", {}).get("ok", False)),
        failures=[_failure_line(f) for f in report.failures],
        report_json=canonical_json(doc), report_key=report.key,
        bytes_per_second=float(rate.get("bytes_per_second", 0)),
        records_per_second=float(rate.get("records_per_second", 0)),
        workers=int(rate.get("workers", 0)),
        records_decrypted=int(doc.get("verified", {}).get("decrypted", 0)),
        sampled=report.sampled, sample_size=int(sample.get("size", 0)),
        population=int(sample.get("population", 0)),
        sample_confidence=float(sample.get("confidence", 0)),
        max_defect_rate=float(sample.get("max_defect_rate", 0)), seed=str(sample.get("seed", "")),
    )  # fmt: skip


def _failure_line(f: RestoreFailure) -> str:
    """``check: what [object key] [record id vN]``: names the item, never its content."""
    record = f"record {f.record_id}" + (f" v{f.version}" if f.version else "")
    where = " ".join(part for part in (f.object_key, record if f.record_id else "") if part)
    return f"{f.check}: {f.detail}" + (f" ({where})" if where else "")


def _checked_id(backup_id: str) -> str:
    try:
        return check_backup_id(backup_id)
    except StorageError as e:
        raise InvalidRecordError("id", str(e)) from e


class _Reporter:
    """The worker's progress callback: throttled, handed to the loop, stoppable."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stoppable: bool) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.gone = threading.Event()
        self._stoppable = stoppable
        self._last: dict[str, float] = {}

    def __call__(self, p: BackupProgress) -> None:
        if self._stoppable and self.gone.is_set():
            raise ClientGoneError("the client cancelled the call")
        now = time.monotonic()
        final = p.done >= p.total
        if not final and now - self._last.get(p.phase, 0.0) < PROGRESS_INTERVAL:
            return
        self._last[p.phase] = now
        self.hand_over(p)

    def hand_over(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop closed: the server is shutting down
            self.gone.set()


@dataclass(frozen=True, slots=True)
class _Finished(Generic[R]):
    result: R


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


async def _with_progress(
    work: Callable[[_Reporter], R], *, stoppable: bool
) -> AsyncIterator[BackupProgress | R]:
    """Run ``work(report)`` in a thread of its own; yield its progress, then its result.

    A thread of its own, not the shared pool: a backup or a drill can take hours and
    must not hold a worker that record calls, the guard and the audit trail need.
    """
    reporter = _Reporter(asyncio.get_running_loop(), stoppable)

    def run() -> None:
        try:
            reporter.hand_over(_Finished(work(reporter)))
        except BaseException as e:  # noqa: BLE001  (handed to the caller's task)
            reporter.hand_over(_Failed(e))

    threading.Thread(target=run, name="backup-call", daemon=True).start()
    try:
        while True:
            item = await reporter.queue.get()
            if isinstance(item, _Failed):
                raise item.error
            if isinstance(item, _Finished):
                yield item.result
                return
            yield item  # type: ignore[misc]  # a BackupProgress
    finally:
        reporter.gone.set()  # a verify or drill stops at its next report


def _progress_pb(p: BackupProgress) -> bpb.Progress:
    return bpb.Progress(phase=p.phase, done=p.done, total=p.total, bytes_done=p.bytes)


class BackupServicer(bpb_grpc.BackupServiceServicer):  # type: ignore[misc]  # untyped stub
    """medvault.v1.BackupService."""

    def __init__(self, backups: Backups, guard: AccessGuard) -> None:
        self._backups = backups
        self._guard = guard

    def _enter(self, state: CallState, resource: str, reason: str) -> Call:
        call = entered(state)
        state.resource = resource
        self._guard.audit(call, resource, outcome="allowed", reason=reason)
        return call

    async def _enter_async(self, state: CallState, resource: str, reason: str) -> Call:
        return await asyncio.to_thread(self._enter, state, resource, reason)

    def _audited(
        self, call: Call, work: Callable[[_Reporter], R], ending: Ending[R]
    ) -> Callable[[_Reporter], R]:
        """``work`` that writes the call's closing event itself, in the worker.

        So the event says what really happened even when the client went away meanwhile.
        A failure while the client is still there is audited by ``handled`` instead.
        """

        def run(reporter: _Reporter) -> R:
            try:
                result = work(reporter)
            except Exception as e:
                if reporter.gone.is_set():
                    self._end(call, "backup", "failed", f"stopped ({type(e).__name__})")
                raise
            self._end(call, *ending(result))
            return result

        return run

    def _end(self, call: Call, resource: str, outcome: Outcome, reason: str) -> None:
        try:
            self._guard.audit(call, resource, outcome=outcome, reason=reason)
        except Exception:  # the work is done or failed already; the log keeps this
            log.exception("could not audit the end of a backup call")

    async def RunBackup(  # noqa: N802  (gRPC method names)
        self, request: bpb.RunBackupRequest, context: aio.ServicerContext
    ) -> AsyncIterator[bpb.RunBackupResponse]:
        """Take a backup now, streaming progress, then its summary."""
        async with handled(self._guard, context, "RunBackup") as state:
            call = await self._enter_async(state, "backup", "backup started")
            work = self._audited(call, lambda r: self._backups.run("manual", r), _backup_ending)
            async for item in _with_progress(work, stoppable=False):
                if isinstance(item, BackupProgress):
                    yield bpb.RunBackupResponse(progress=_progress_pb(item))
                else:
                    state.resource = f"backup/{item.backup_id}"
                    summary = summary_pb(BackupSummary.of(item.manifest))
                    yield bpb.RunBackupResponse(result=summary)

    async def ListBackups(  # noqa: N802
        self, request: bpb.ListBackupsRequest, context: aio.ServicerContext
    ) -> bpb.ListBackupsResponse:
        """Every complete backup in the target, newest first."""
        async with handled(self._guard, context, "ListBackups") as state:
            await self._enter_async(state, "backup", "list backups")
            backups = await asyncio.to_thread(self._backups.list_backups)
            return bpb.ListBackupsResponse(backups=[summary_pb(b) for b in backups])
        raise AssertionError("unreachable")  # pragma: no cover

    async def VerifyBackup(  # noqa: N802
        self, request: bpb.VerifyBackupRequest, context: aio.ServicerContext
    ) -> AsyncIterator[bpb.VerifyBackupResponse]:
        """Check the signature and every object; stream progress, then the report."""
        async with handled(self._guard, context, "VerifyBackup") as state:
            backup_id = _checked_id(request.id)
            how = " --read-data" if request.read_data else ""
            state.resource = f"backup/{backup_id}"
            await asyncio.to_thread(self._backups.require_complete, backup_id)
            call = await self._enter_async(state, f"backup/{backup_id}", f"verify{how} started")
            work = self._audited(
                call, lambda r: self._backups.verify(backup_id, request.read_data, r),
                lambda report: _verify_ending(report, how),
            )  # fmt: skip
            async for item in _with_progress(work, stoppable=True):
                if isinstance(item, BackupProgress):
                    yield bpb.VerifyBackupResponse(progress=_progress_pb(item))
                else:
                    yield bpb.VerifyBackupResponse(report=verify_pb(item))

    async def RunRestoreDrill(  # noqa: N802
        self, request: bpb.RunRestoreDrillRequest, context: aio.ServicerContext
    ) -> AsyncIterator[bpb.RunRestoreDrillResponse]:
        """Restore into a scratch place and check every record; stream, then the report."""
        async with handled(self._guard, context, "RunRestoreDrill") as state:
            backup_id = _checked_id(request.id)
            state.resource = f"backup/{backup_id}"
            # Bad sample settings: INVALID_ARGUMENT naming the field (audited by handled).
            plan = sample_plan(request.sample_confidence, request.max_defect_rate, request.seed)
            # Refused (NOT_FOUND, audited) before anything is restored or a report written.
            await asyncio.to_thread(self._backups.require_complete, backup_id)
            what = "restore drill started" if plan is None else (
                f"sampled restore drill started (confidence {plan.confidence:g}, max defect "
                f"rate {plan.max_defect_rate:g}, {plan.size} records, seed {plan.seed.hex()})"
            )  # fmt: skip
            call = await self._enter_async(state, f"backup/{backup_id}", what)
            work = self._audited(
                call, lambda r: self._backups.drill(backup_id, r, plan), _drill_ending
            )
            async for item in _with_progress(work, stoppable=True):
                if isinstance(item, BackupProgress):
                    yield bpb.RunRestoreDrillResponse(progress=_progress_pb(item))
                else:
                    yield bpb.RunRestoreDrillResponse(report=drill_pb(item))

    async def PruneBackups(  # noqa: N802
        self, request: bpb.PruneBackupsRequest, context: aio.ServicerContext
    ) -> bpb.PruneBackupsResponse:
        """Apply the retention policy (the configured one, or this call's overrides)."""
        async with handled(self._guard, context, "PruneBackups") as state:
            policy = _policy(self._backups.retention, request)
            grace = _grace(request)
            dry = " (dry run)" if request.dry_run else ""
            rules = (f"keep daily {policy.keep_daily}, weekly {policy.keep_weekly}, "
                     f"monthly {policy.keep_monthly}")  # fmt: skip
            call = await self._enter_async(state, "backup", f"prune started{dry}: {rules}")
            result = await asyncio.to_thread(
                self._backups.prune, policy=policy, grace=grace, dry_run=request.dry_run
            )
            verb = "would remove" if request.dry_run else "removed"
            await asyncio.to_thread(
                self._end, call, "backup", "allowed",
                f"prune{dry}: kept {len(result.kept)}, {verb} {len(result.removed)} backups, "
                f"{result.objects_removed} objects, {result.bytes_removed} bytes",
            )  # fmt: skip
            return bpb.PruneBackupsResponse(
                kept=list(result.kept), removed=list(result.removed),
                objects_removed=result.objects_removed, bytes_removed=result.bytes_removed,
                leftovers_removed=result.leftovers_removed,
                objects_deferred=result.objects_deferred, dry_run=request.dry_run,
            )  # fmt: skip
        raise AssertionError("unreachable")  # pragma: no cover

    async def GetBackupPublicKey(  # noqa: N802
        self, request: bpb.GetBackupPublicKeyRequest, context: aio.ServicerContext
    ) -> bpb.BackupPublicKey:
        """The manifest-signing public key (PEM), for verification without the token."""
        async with handled(self._guard, context, "GetBackupPublicKey") as state:
            await self._enter_async(state, "backup", "export manifest-signing public key")
            pem = await asyncio.to_thread(self._backups.public_key_pem)
            return bpb.BackupPublicKey(
                public_key_pem=pem, key_label=self._backups.key_label, algorithm=ALGORITHM
            )
        raise AssertionError("unreachable")  # pragma: no cover


def _grace(request: bpb.PruneBackupsRequest) -> timedelta:
    """The call's grace (hours, 0 to ``MAX_GRACE_HOURS``), or the default."""
    if not request.HasField("grace_hours"):
        return DEFAULT_GRACE
    hours = request.grace_hours
    if not 0 <= hours <= MAX_GRACE_HOURS:  # NaN fails both comparisons
        raise InvalidRecordError(
            "grace_hours", f"must be a number of hours from 0 to {MAX_GRACE_HOURS}"
        )
    return timedelta(hours=hours)


def _policy(configured: RetentionPolicy, request: bpb.PruneBackupsRequest) -> RetentionPolicy:
    """The configured retention with this call's overrides (each checked)."""
    values = {}
    for rule in ("keep_daily", "keep_weekly", "keep_monthly"):
        values[rule] = (
            getattr(request, rule) if request.HasField(rule) else getattr(configured, rule)
        )
        if values[rule] > MAX_KEEP:
            raise InvalidRecordError(rule, f"must be at most {MAX_KEEP}")
    if not any(values.values()):
        raise InvalidRecordError(
            "keep_daily", "the retention policy would keep nothing; refusing to prune every backup"
        )
    return replace(configured, **values)


def _backup_ending(result: BackupResult) -> tuple[str, Outcome, str]:
    c = result.counts
    reason = (
        f"backup completed: {c['records']} records, {c['objects']} objects; "
        f"copied {result.copied_objects} objects, {result.copied_bytes} bytes"
    )
    return f"backup/{result.backup_id}", "allowed", reason


def _verify_ending(report: VerifyReport, how: str) -> tuple[str, Outcome, str]:
    resource = f"backup/{report.backup_id}"
    if report.ok:
        return resource, "allowed", f"verify{how} passed: {report.objects_checked} objects"
    return resource, "failed", f"verify{how} FAILED: {len(report.failures)} problems"


def _drill_ending(report: DrillReport) -> tuple[str, Outcome, str]:
    resource = f"backup/{report.backup_id}"
    kind = report_kind(report)
    if report.ok:
        took = f"{report.records_verified} records in {report.recovery_seconds:.1f} s"
        return resource, "allowed", f"restore drill passed ({kind}): {took}"
    return resource, "failed", f"restore drill FAILED ({kind}): {len(report.failures)} problems"
