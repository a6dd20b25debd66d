"""``medvault sign|verify|signature``: document signatures over ``SigningService``.

``verify`` exits 1 when any signature is invalid, 0 when all are valid, and 3 when the
record carries no signature at all (nothing to trust is not the same as invalid, but a
script checking "is this signed?" must not read it as success).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from service._gen.medvault.v1 import signing_pb2 as pb
from service._gen.medvault.v1 import signing_pb2_grpc as pb_grpc
from service.cli.client import add_connection_flags, channel
from service.cli.files import create_private
from service.cli.tables import print_table, utc

TIMEOUT = 600  # a multi-GiB record is hashed while it is decrypted
EXIT_UNSIGNED = 3
_FORMAT_NAMES = {pb.SIGNATURE_FORMAT_CADES_DETACHED: "CAdES", pb.SIGNATURE_FORMAT_PADES: "PAdES"}


def _stub(ns: argparse.Namespace) -> pb_grpc.SigningServiceStub:
    return pb_grpc.SigningServiceStub(channel(ns))


def cmd_sign(ns: argparse.Namespace) -> int:
    """Sign a record version with the caller's signer (``--pades``: a new PDF version)."""
    fmt = pb.SIGNATURE_FORMAT_PADES if ns.pades else pb.SIGNATURE_FORMAT_CADES_DETACHED
    request = pb.SignRecordRequest(
        record_id=ns.record, version=ns.version, signer=ns.signer, format=fmt
    )
    info = _stub(ns).SignRecord(request, timeout=TIMEOUT)
    how = ", PAdES embedded in this new version" if ns.pades else ""
    print(f"signature {info.id}: record {info.record_id} v{info.version} signed by "
          f"{info.signer} ({info.algorithm}{how}) at {utc(info.signing_time)}")  # fmt: skip
    return 0


def cmd_verify(ns: argparse.Namespace) -> int:
    """A table of every signature of the version; exit 1 if any is invalid."""
    request = pb.VerifyRecordRequest(record_id=ns.record, version=ns.version)
    results = list(_stub(ns).VerifyRecord(request, timeout=TIMEOUT).results)
    if not results:
        print("no signatures on this record version", file=sys.stderr)
        return EXIT_UNSIGNED
    rows = [
        (r.signature.id, r.signature.signer, utc(r.signature.signing_time),
         r.signature.algorithm, _FORMAT_NAMES.get(r.signature.format, ""),
         "valid" if r.valid else "INVALID", r.reason)
        for r in results
    ]  # fmt: skip
    print_table(("id", "signer", "signing time", "algorithm", "format", "result", "reason"),
                rows, max_widths={6: 60})  # fmt: skip
    return 0 if all(r.valid for r in results) else 1


def cmd_signature(ns: argparse.Namespace) -> int:
    """Write one signature's ``.p7s`` (DER): by ``--id``, else the record's latest."""
    stub = _stub(ns)
    signature_id = ns.id
    if not signature_id:
        if not ns.record:
            print("medvault: give RECORD or --id SIGNATURE_ID", file=sys.stderr)
            return 2
        request = pb.VerifyRecordRequest(record_id=ns.record, version=ns.version)
        results = list(stub.VerifyRecord(request, timeout=TIMEOUT).results)
        if not results:
            print("no signatures on this record version", file=sys.stderr)
            return EXIT_UNSIGNED
        signature_id = results[-1].signature.id
    reply = stub.GetSignature(pb.GetSignatureRequest(signature_id=signature_id), timeout=60)
    with create_private(Path(ns.output)) as f:  # names the signer: owner only
        f.write(reply.p7s)
    print(f"wrote {len(reply.p7s)} bytes (signature {signature_id}) to {ns.output}")
    return 0


def register(sub: Any) -> None:
    """Add sign, verify and signature to the CLI."""
    sign = sub.add_parser("sign", help="sign a record with your signer's token key")
    sign.add_argument("record", help="record id (as printed by put or ls)")
    sign.add_argument("--signer", required=True, help="signer name (your own principal)")
    sign.add_argument("--version", type=int, default=0, help="0 = latest")
    sign.add_argument(
        "--pades", action="store_true",
        help="PDF records: embed a PAdES-B-B signature in a new version (PDF readers show "
        "it) instead of a detached .p7s",
    )  # fmt: skip
    sign.set_defaults(func=cmd_sign)
    verify = sub.add_parser("verify", help="verify every signature of a record")
    verify.add_argument("record", help="record id (as printed by put or ls)")
    verify.add_argument("--version", type=int, default=0, help="0 = latest")
    verify.set_defaults(func=cmd_verify)
    signature = sub.add_parser("signature", help="export a signature as a .p7s file")
    signature.add_argument("record", nargs="?", default="",
                           help="record id (or give --id alone)")
    signature.add_argument("--id", default="", help="signature id (default: the latest)")
    signature.add_argument("--version", type=int, default=0, help="0 = latest")
    signature.add_argument("-o", "--output", required=True, help="FILE.p7s (DER)")
    signature.set_defaults(func=cmd_signature)
    for p in (sign, verify, signature):
        add_connection_flags(p)
