"""``medvault put|get|stat|ls``: records at a terminal, with progress bars on large files."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import grpc
from tqdm import tqdm

from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from service.cli import bulk
from service.cli.client import add_connection_flags, channel, describe_rpc_error
from service.cli.detect import detect_kind
from service.cli.files import create_private

CHUNK = 1 << 20
KINDS = ["HL7V2", "CDA", "FHIR", "DICOM", "PDF", "OTHER"]
_CONTENT_TYPES = {
    "HL7V2": "x-application/hl7-v2+er7",
    "CDA": "application/xml",
    "FHIR": "application/fhir+json",
    "DICOM": "application/dicom",
    "PDF": "application/pdf",
    "OTHER": "application/octet-stream",
}


def _progress(total: int, label: str) -> tqdm[Any]:
    # Shown on a terminal for files over a few MiB; rate and ETA come with tqdm.
    quiet = not sys.stderr.isatty() or total < (8 << 20)
    return tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=quiet, file=sys.stderr)


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.digest()


def _requests(
    ns: argparse.Namespace, path: Path, request_id: str
) -> Iterator[pb.PutRecordRequest]:
    header = pb.RecordHeader(
        patient=pb.PatientId(id=ns.patient, assigning_authority=ns.authority),
        kind=f"RECORD_KIND_{ns.kind}",
        content_type=ns.content_type or _CONTENT_TYPES[ns.kind],
        title=ns.title,
        supersedes=ns.supersedes or "",
        expected_sha256=_file_digest(path),
        request_id=request_id,
    )
    yield pb.PutRecordRequest(header=header)
    with path.open("rb") as f, _progress(path.stat().st_size, "upload") as bar:
        while block := f.read(CHUNK):
            bar.update(len(block))
            yield pb.PutRecordRequest(chunk=block)


def _print_record(r: pb.Record) -> None:
    created = r.created_at.ToDatetime().isoformat(timespec="seconds")
    kind = pb.RecordKind.Name(r.kind).removeprefix("RECORD_KIND_")
    print(f"{r.id}  v{r.version}  {kind:<6} {r.size:>12}  {created}Z  {r.title}")


def _bulk_header(ns: argparse.Namespace, path: Path) -> pb.RecordHeader:
    kind = detect_kind(path) if ns.kind == "auto" else ns.kind
    return pb.RecordHeader(
        patient=pb.PatientId(id=ns.patient, assigning_authority=ns.authority),
        kind=f"RECORD_KIND_{kind}",
        content_type=ns.content_type or _CONTENT_TYPES[kind],
        title=ns.title,
        request_id=str(uuid.uuid4()),  # for the retry on UNAVAILABLE
    )


def cmd_bulk_put(ns: argparse.Namespace) -> int:
    """Store every file named and under the folders named; see ``service.cli.bulk``."""
    for flag, value in (("--supersedes", ns.supersedes), ("--request-id", ns.request_id)):
        if value:
            raise SystemExit(f"medvault: {flag} applies to one file, not to a bulk put")
    if ns.kind == "auto" and ns.content_type:
        raise SystemExit("medvault: --content-type needs one --kind, not auto")
    paths = bulk.files_under(ns.file)
    return bulk.run(channel(ns), paths, lambda path: _bulk_header(ns, path))


def cmd_put(ns: argparse.Namespace) -> int:
    """Store FILE as a record (or a new version with --supersedes); several: a bulk put."""
    if len(ns.file) > 1 or ns.kind == "auto" or Path(ns.file[0]).is_dir():
        return cmd_bulk_put(ns)
    path = Path(ns.file[0])
    if not path.is_file():
        raise SystemExit(f"medvault: {path}: not a file")
    stub = pb_grpc.RecordServiceStub(channel(ns))
    # One id for the put and its retry: if the first attempt was stored but its reply
    # lost (a replica died), the retry returns that record instead of a second one.
    request_id = ns.request_id or str(uuid.uuid4())
    try:
        record = stub.PutRecord(_requests(ns, path, request_id))
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        print(f"medvault: {e.details()}; retrying once (request id {request_id})", file=sys.stderr)
        record = stub.PutRecord(_requests(ns, path, request_id))
    print(f"stored {record.id} version {record.version} ({record.size} bytes)")
    return 0


def _open_output(out: Path) -> tuple[Path, BinaryIO]:
    """Create ``out``'s scratch file now: a path that cannot be written fails before the read."""
    if out.is_dir():
        raise SystemExit(f"medvault: -o {out}: is a directory; name a file")
    if not out.parent.is_dir():
        raise SystemExit(f"medvault: -o {out}: directory {out.parent} does not exist")
    partial = out.with_name(out.name + ".partial")
    try:
        partial.unlink(missing_ok=True)  # a fresh file: a stale one keeps no say
        return partial, create_private(partial, exclusive=True)  # patient data: owner only
    except OSError as e:
        raise SystemExit(f"medvault: -o {out}: cannot write: {e.strerror}") from None


def cmd_get(ns: argparse.Namespace) -> int:
    """Fetch a record's content into a file (mode 0600); a partial file is removed on error.

    The output file is created before the read is requested, so a path that cannot be
    written costs no audited read of content that would never be delivered.
    """
    out = Path(ns.output)
    partial, f = _open_output(out)
    try:
        with f:
            stub = pb_grpc.RecordServiceStub(channel(ns))
            stream = stub.GetRecord(pb.GetRecordRequest(id=ns.id, version=ns.version))
            bar = None
            for response in stream:
                if response.WhichOneof("message") == "metadata":
                    bar = _progress(response.metadata.size, "download")
                    continue
                f.write(response.chunk)
                if bar is not None:
                    bar.update(len(response.chunk))
            if bar is not None:
                bar.close()
        partial.replace(out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    print(f"wrote {out}")
    return 0


def cmd_stat(ns: argparse.Namespace) -> int:
    """Print one version's metadata."""
    stub = pb_grpc.RecordServiceStub(channel(ns))
    r = stub.StatRecord(pb.StatRecordRequest(id=ns.id, version=ns.version))
    print(f"id:           {r.id}\nversion:      {r.version}\nkind:         "
          f"{pb.RecordKind.Name(r.kind).removeprefix('RECORD_KIND_')}\n"
          f"content type: {r.content_type}\nsize:         {r.size}\n"
          f"stored size:  {r.stored_size}\nsha256:       {r.sha256.hex()}\n"
          f"created:      {r.created_at.ToDatetime().isoformat()}Z by {r.created_by}\n"
          f"title:        {r.title}")  # fmt: skip
    return 0


def cmd_ls(ns: argparse.Namespace) -> int:
    """List a patient's records, newest first, following page tokens."""
    stub = pb_grpc.RecordServiceStub(channel(ns))
    request = pb.ListRecordsRequest(
        patient=pb.PatientId(id=ns.patient, assigning_authority=ns.authority),
        kind=f"RECORD_KIND_{ns.kind}" if ns.kind else "RECORD_KIND_UNSPECIFIED",
        all_versions=ns.all_versions,
        page_size=100,
        document_code=ns.document_code, study_uid=ns.study, series_uid=ns.series,
        modality=ns.modality, observation_code=ns.observation, date_from=ns.date_from,
        date_to=ns.date_to,
    )  # fmt: skip
    if ns.since:
        request.created_after.FromDatetime(datetime.fromisoformat(ns.since))
    while True:
        page = stub.ListRecords(request)
        for record in page.records:
            _print_record(record)
        if not page.next_page_token:
            return 0
        request.page_token = page.next_page_token


def _patient_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--patient", required=True, help="patient identifier")
    p.add_argument(
        "--authority",
        default=os.environ.get("MEDVAULT_AUTHORITY"),
        required="MEDVAULT_AUTHORITY" not in os.environ,
        help="assigning authority of the identifier (or MEDVAULT_AUTHORITY)",
    )


def register(sub: Any) -> None:
    """Add put, get, stat and ls to the CLI."""
    put = sub.add_parser("put", help="store files as records (folders: every file under them)")
    put.add_argument(
        "file", nargs="+",
        help="the file to store; several files or folders: a bulk put (4 at a time, a summary)",
    )  # fmt: skip
    _patient_flags(put)
    put.add_argument(
        "--kind", required=True, choices=[*KINDS, "auto"],
        help="record kind (sets the default --content-type); auto: told from each file's content",
    )  # fmt: skip
    put.add_argument(
        "--content-type", default="",
        help="MIME type stored with the record (default: the kind's, e.g. application/pdf)",
    )  # fmt: skip
    put.add_argument("--title", default="", help="a short title shown by ls (default: none)")
    put.add_argument("--supersedes", help="record id this file amends (new version)")
    put.add_argument(
        "--request-id", default="",
        help="idempotency key (16-64 of A-Z a-z 0-9 . _ -); default a random UUID. Reuse it "
        "to retry a put whose outcome is unknown: the first result is returned",
    )  # fmt: skip
    put.set_defaults(func=cmd_put)
    get = sub.add_parser("get", help="fetch a record's content")
    get.add_argument("id", help="record id (32 hex digits)")
    get.add_argument(
        "-o", "--output", required=True,
        help="file to write (created 0600; its directory must exist)",
    )  # fmt: skip
    get.add_argument("--version", type=int, default=0, help="version to fetch (0 = latest)")
    get.set_defaults(func=cmd_get)
    stat = sub.add_parser("stat", help="show a record's metadata")
    stat.add_argument("id", help="record id (32 hex digits)")
    stat.add_argument("--version", type=int, default=0, help="version to show (0 = latest)")
    stat.set_defaults(func=cmd_stat)
    ls = sub.add_parser("ls", help="list a patient's records")
    _patient_flags(ls)
    ls.add_argument("--kind", choices=KINDS, help="only records of this kind")
    ls.add_argument("--since", help="ISO date-time; records created after it")
    ls.add_argument("--all-versions", action="store_true", help="every version, not the latest")
    ls.add_argument("--document-code", default="",
                    help="document code, e.g. LOINC 18842-5 (CDA, FHIR documents)")
    ls.add_argument("--study", default="", help="DICOM Study Instance UID")
    ls.add_argument("--series", default="", help="DICOM Series Instance UID")
    ls.add_argument("--modality", default="", help="DICOM modality, e.g. CT")
    ls.add_argument("--observation", default="",
                    help="observation code: HL7 v2 OBX-3 (e.g. 11073 150456) or FHIR")
    ls.add_argument("--date-from", default="", help="clinical date YYYY-MM-DD, inclusive")
    ls.add_argument("--date-to", default="", help="clinical date YYYY-MM-DD, inclusive")
    ls.set_defaults(func=cmd_ls)
    for p in (put, get, stat, ls):
        add_connection_flags(p)


def rpc_error_exit(e: grpc.RpcError) -> int:
    """Print a failed call's status and message (or why it could not connect); exit 1."""
    print(describe_rpc_error(e), file=sys.stderr)
    return 1
