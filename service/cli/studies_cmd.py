"""``medvault studies``: a patient's imaging studies, and a study's instances to a folder."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from service.cli.client import add_connection_flags, channel
from service.cli.files import create_private

# Names made from what the server sends: UIDs (digits and dots) or record ids (hex) only,
# so no name can leave the output folder.
_SAFE_NAME = re.compile(r"[0-9][0-9.]{0,63}\Z|[0-9a-f]{32}\Z")


def cmd_studies(ns: argparse.Namespace) -> int:
    """List the patient's studies, newest first; with ``--get UID -o DIR``, save one."""
    stub = pb_grpc.RecordServiceStub(channel(ns))
    if ns.get:
        try:
            return _save_study(stub, ns.get, Path(ns.output))
        except FileExistsError as e:
            print(f"medvault: {e.filename} exists; save the study into an empty folder (-o)",
                  file=sys.stderr)
            return 1
    if not ns.patient or not ns.authority:
        print("medvault: studies needs --patient and --authority (or MEDVAULT_AUTHORITY), "
              "or --get STUDY_UID", file=sys.stderr)
        return 2
    reply = stub.ListStudies(pb.ListStudiesRequest(
        patient=pb.PatientId(id=ns.patient, assigning_authority=ns.authority)))
    for s in reply.studies:
        print(f"{s.study_uid}  {s.study_date or '-':10}  {','.join(s.modalities) or '-':8}  "
              f"{s.series_count} series  {s.instance_count} instances")
    return 0


def _save_study(stub: pb_grpc.RecordServiceStub, study_uid: str, out: Path) -> int:
    """Write each instance the caller may read as DIR/<series>/<sop instance>.dcm."""
    count = 0
    handle: Any = None
    try:
        for response in stub.GetStudy(pb.GetStudyRequest(study_uid=study_uid)):
            if response.WhichOneof("message") == "instance":
                if handle is not None:
                    handle.close()
                instance = response.instance
                folder = out / _safe(instance.series_uid, "series")
                folder.mkdir(parents=True, exist_ok=True)
                name = _safe(instance.sop_instance_uid, _safe(instance.record.id, str(count)))
                handle = create_private(folder / f"{name}.dcm", exclusive=True)
                count += 1
            elif handle is not None:
                handle.write(response.chunk)
    finally:
        if handle is not None:
            handle.close()
    print(f"wrote {count} instances under {out}", file=sys.stderr)
    return 0


def _safe(name: str, fallback: str) -> str:
    return name if _SAFE_NAME.match(name) and name not in (".", "..") else fallback


def register(sub: Any) -> None:
    """Add ``studies`` to the CLI."""
    p = sub.add_parser("studies", help="list a patient's imaging studies, or save one")
    p.add_argument("--patient", default="", help="patient identifier (to list studies)")
    p.add_argument("--authority", default=os.environ.get("MEDVAULT_AUTHORITY", ""),
                   help="assigning authority of the identifier (or MEDVAULT_AUTHORITY)")
    p.add_argument("--get", metavar="STUDY_UID", default="",
                   help="save every instance of this study you may read")
    p.add_argument("-o", "--output", default=".", help="folder for --get (default: here)")
    p.set_defaults(func=cmd_studies)
    add_connection_flags(p)
