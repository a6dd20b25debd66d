"""``medvault import-dicom PATH``: a folder of DICOM files or a patient CD's DICOMDIR.

Every instance is filed under the patient its header names (PatientID with
IssuerOfPatientID mapped to the assigning authority as the DICOM network service does:
``service.dicom.scp.instance_patient``). With ``--patient`` every instance is put under
that patient instead, and the server's content check refuses (and audits) an instance
that names another. The request id of each put is derived from the SOP Instance UID
(``service.dicom.scp.instance_key``, as C-STORE does), so importing the same CD again
stores nothing twice.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path
from typing import Any

from service._gen.medvault.v1 import records_pb2 as pb
from service.cli import bulk
from service.cli.client import add_connection_flags, channel
from storage import InvalidRecordError

DICOMDIR = "DICOMDIR"
CONTENT_TYPE = "application/dicom"


def _dicomdir(path: Path) -> Path | None:
    """The DICOMDIR that ``path`` is or holds at its top, if any."""
    if path.is_file() and path.name.upper() == DICOMDIR:
        return path
    if path.is_dir():
        return next((p for p in path.iterdir() if p.name.upper() == DICOMDIR), None)
    return None


def instances(path: Path) -> list[Path]:
    """The files to import: those a DICOMDIR lists, else every file under ``path``."""
    dicomdir = _dicomdir(path)
    if dicomdir is None:
        return bulk.files_under([str(path)])
    from pydicom.errors import InvalidDicomError  # noqa: PLC0415  (loaded on use)
    from pydicom.fileset import FileSet  # noqa: PLC0415

    # Before the DICOMDIR is read: service.dicom switches pydicom's read-time validation
    # off (and, through storage, keeps pydicom's logger out of ours); it would log a
    # malformed value quoted, on this command's stderr.
    import service.dicom  # noqa: F401, PLC0415

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fileset = FileSet(dicomdir)
    except (InvalidDicomError, OSError, ValueError, KeyError, AttributeError):
        # pydicom's message may quote the records; the path and the problem suffice.
        raise SystemExit(f"medvault: {dicomdir}: not a readable DICOMDIR") from None
    return [Path(instance.path) for instance in fileset]


def _is_part10(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(132)[128:] == b"DICM"


def header(ns: argparse.Namespace, path: Path) -> pb.RecordHeader:
    """The PutRecord header of one instance; RefusedError / SkippedError otherwise."""
    # Loaded on use: pydicom and the DICOM service's mapping cost every other command
    # a second at start (tests/unit/service/test_cli_help.py holds the CLI to that).
    from service.dicom.scp import instance_key, instance_patient  # noqa: PLC0415
    if not path.exists():
        raise bulk.RefusedError("listed in the DICOMDIR but missing")
    if not _is_part10(path):
        raise bulk.SkippedError("not a DICOM Part 10 file (no DICM preamble)")
    try:
        named, sop_instance = instance_patient(path)
    except InvalidRecordError as e:
        raise bulk.RefusedError(str(e)) from None
    patient = (
        pb.PatientId(id=ns.patient, assigning_authority=ns.authority) if ns.patient
        else pb.PatientId(id=named.id, assigning_authority=named.authority)
    )  # fmt: skip
    return pb.RecordHeader(
        patient=patient, kind="RECORD_KIND_DICOM", content_type=CONTENT_TYPE,
        title=ns.title, request_id=instance_key(sop_instance),
    )  # fmt: skip


def cmd_import_dicom(ns: argparse.Namespace) -> int:
    """Import a folder or DICOMDIR; the summary names each refusal; 1 if any."""
    path = Path(ns.path)
    if not path.exists():
        raise SystemExit(f"medvault: {path}: no such file or folder")
    if ns.patient and not ns.authority:
        raise SystemExit("medvault: --patient needs --authority (or MEDVAULT_AUTHORITY)")
    return bulk.run(channel(ns), instances(path), lambda p: header(ns, p))


def register(sub: Any) -> None:
    """Add import-dicom to the CLI."""
    p = sub.add_parser(
        "import-dicom", help="import a folder of DICOM files or a patient CD (DICOMDIR)"
    )
    p.add_argument("path", help="a folder, a CD's root, or its DICOMDIR file")
    p.add_argument(
        "--patient", default="",
        help="the patient every instance must name (refused for any that names another)",
    )  # fmt: skip
    p.add_argument(
        "--authority", default=os.environ.get("MEDVAULT_AUTHORITY", ""),
        help="assigning authority of --patient (or MEDVAULT_AUTHORITY)",
    )  # fmt: skip
    p.add_argument("--title", default="", help="a short title shown by ls (default: none)")
    add_connection_flags(p)
    p.set_defaults(func=cmd_import_dicom)
