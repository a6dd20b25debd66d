"""Many files through ``PutRecord`` at once: ``medvault put`` of folders, ``import-dicom``.

Files go up concurrently over one channel (``WORKERS`` puts in flight, each streaming
its file in 1 MiB chunks, so memory does not grow with the number or size of files).
On a terminal one progress bar counts files; elsewhere each file gets a line. The
summary names every refusal with its reason; the exit code is 1 if any file was
refused. A refusal by the server is audited there; a file refused here (unreadable,
kind not recognised, no patient in a DICOM header) was never sent.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import grpc
from tqdm import tqdm

from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from service.cli.client import describe_rpc_error

CHUNK = 1 << 20
WORKERS = 4


class RefusedError(Exception):
    """A file refused before it is sent; the message is the reason (no patient data)."""


class SkippedError(Exception):
    """A file that is not for this command (e.g. a viewer program on a patient CD)."""


# Builds a file's header (without expected_sha256); raises RefusedError or SkippedError.
Prepare = Callable[[Path], pb.RecordHeader]


@dataclass(frozen=True)
class Outcome:
    """What became of one file."""

    path: Path
    record: pb.Record | None = None
    reason: str = ""  # why it was refused or skipped
    skipped: bool = False
    earlier: bool = False  # the server already had it (same request id): nothing new


def _walk(folder: Path) -> list[Path]:
    """The regular files under ``folder``, in order. A symbolic link met on the way is
    not followed (a CD or folder from elsewhere could link to any file of this machine,
    which would then be sent): it is named on stderr as skipped."""
    found: list[Path] = []
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            print(f"skipped {p}: a symbolic link, not followed", file=sys.stderr)
        elif p.is_file():
            found.append(p)
    return found


def files_under(paths: Iterable[str]) -> list[Path]:
    """The files named and those under the folders named (recursively), in order."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found.extend(_walk(path))
        elif path.is_file():
            found.append(path)
        else:
            raise SystemExit(f"medvault: {path}: no such file or folder")
    return found


def _digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.digest()


def _requests(header: pb.RecordHeader, path: Path) -> Iterator[pb.PutRecordRequest]:
    yield pb.PutRecordRequest(header=header)
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            yield pb.PutRecordRequest(chunk=block)


def _reason(e: grpc.RpcError) -> str:
    return describe_rpc_error(e).removeprefix("medvault: ")


def put_one(stub: pb_grpc.RecordServiceStub, path: Path, prepare: Prepare,
            started: datetime) -> Outcome:
    """Prepare and store one file; retried once on UNAVAILABLE with the same request id."""
    try:
        header = prepare(path)
        header.expected_sha256 = _digest(path)
        try:
            record = stub.PutRecord(_requests(header, path))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or not header.request_id:
                raise
            record = stub.PutRecord(_requests(header, path))
    except SkippedError as e:
        return Outcome(path, reason=str(e), skipped=True)
    except RefusedError as e:
        return Outcome(path, reason=str(e))
    except grpc.RpcError as e:
        return Outcome(path, reason=_reason(e))
    except OSError as e:
        return Outcome(path, reason=f"cannot read: {e.strerror or e}")
    earlier = record.created_at.ToDatetime(tzinfo=UTC) < started
    return Outcome(path, record=record, earlier=earlier)


def _line(outcome: Outcome) -> str:
    if outcome.record is not None:
        r = outcome.record
        verb = "already stored" if outcome.earlier else "stored"
        return f"{verb} {outcome.path} -> {r.id} version {r.version} ({r.size} bytes)"
    return f"{'skipped' if outcome.skipped else 'refused'} {outcome.path}: {outcome.reason}"


def _outcomes(stub: pb_grpc.RecordServiceStub, paths: list[Path], prepare: Prepare,
              workers: int) -> Iterator[Outcome]:
    """Each file's outcome as it completes, with at most ``2 * workers`` queued."""
    started = datetime.now(UTC)
    pending: set[Future[Outcome]] = set()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="put") as pool:
        for path in paths:
            if len(pending) >= 2 * workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in done)
            pending.add(pool.submit(put_one, stub, path, prepare, started))
        for future in pending:
            yield future.result()


def summary(outcomes: list[Outcome]) -> list[str]:
    """The closing lines: the counts, then each refusal with its reason."""
    stored = [o for o in outcomes if o.record is not None]
    earlier = sum(1 for o in stored if o.earlier)
    skipped = sum(1 for o in outcomes if o.skipped)
    refused = [o for o in outcomes if o.record is None and not o.skipped]
    counts = f"stored {len(stored) - earlier}, already stored {earlier}, refused {len(refused)}"
    lines = [counts + (f", skipped {skipped}" if skipped else "")]
    lines += [f"refused {o.path}: {o.reason}" for o in refused]
    return lines


def run(channel: grpc.Channel, paths: list[Path], prepare: Prepare, *,
        workers: int = WORKERS, out: TextIO | None = None) -> int:
    """Store ``paths``; print progress and the summary; 1 if any file was refused."""
    out = out or sys.stdout
    stub = pb_grpc.RecordServiceStub(channel)
    terminal = sys.stderr.isatty()
    outcomes: list[Outcome] = []
    with tqdm(total=len(paths), unit="file", desc="put", disable=not terminal,
              file=sys.stderr) as bar:  # fmt: skip
        for outcome in _outcomes(stub, paths, prepare, workers):
            outcomes.append(outcome)
            bar.update(1)
            if not terminal:
                print(_line(outcome), file=out, flush=True)
    for line in summary(outcomes):
        print(line, file=out)
    refused = any(o.record is None and not o.skipped for o in outcomes)
    return 1 if refused else 0
