"""``medvault stats``: SDMX-HD statistics for the Ministry (docs/statistics.md).

``stats export --period YYYY-MM`` asks the service for the month's counts (one audited
``CountRecords`` call with the caller's certificate; small cells are withheld by the
service) and writes them as an SDMX-ML 2.1 StructureSpecificData message. ``stats dsd``
prints the data structure definition the message refers to.
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import stats_pb2 as spb
from service._gen.medvault.v1 import stats_pb2_grpc as spb_grpc
from service.cli import sdmx
from service.cli.client import add_connection_flags, channel

_MONTH = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])")


def month(text: str) -> str:
    """``--period``: a month as YYYY-MM."""
    if not _MONTH.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a month as YYYY-MM, e.g. 2026-10")
    return text


def cells(reply: spb.CountRecordsResponse) -> list[sdmx.Cell]:
    """The observations of a reply; a suppressed count stays withheld."""
    return [
        sdmx.Cell(
            pb.RecordKind.Name(c.kind).removeprefix("RECORD_KIND_"),
            None if c.suppressed else c.records,
        )
        for c in reply.counts
    ]


def _write(data: bytes, output: str) -> None:
    if output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        Path(output).write_bytes(data)


def cmd_export(ns: argparse.Namespace) -> int:
    """Write the month's SDMX-ML data message to ``--output`` (default stdout)."""
    stub = spb_grpc.StatsServiceStub(channel(ns))
    reply = stub.CountRecords(spb.CountRecordsRequest(period=ns.period))
    observations = cells(reply)
    message = sdmx.data_message(reply.facility, reply.period, observations, datetime.now(UTC))
    _write(message, ns.output)
    withheld = sum(1 for o in observations if o.count is None)
    where = "" if ns.output == "-" else f" to {ns.output}"
    rule = f"counts from 1 to {reply.min_cell - 1}" if reply.min_cell > 1 else "stats.min_cell 1"
    print(
        f"wrote {len(observations)} observations for facility {reply.facility}, "
        f"{reply.period} ({reply.time_zone}){where}; {withheld} withheld ({rule})",
        file=sys.stderr,
    )
    return 0


def cmd_dsd(ns: argparse.Namespace) -> int:
    """Write the shipped SDMX-ML 2.1 structure message (no service call)."""
    _write(sdmx.structure_message(), ns.output)
    return 0


def register(sub: Any) -> None:
    """Add ``stats export`` and ``stats dsd`` to the CLI."""
    p = sub.add_parser("stats", help="SDMX-HD statistics: de-identified monthly counts")
    inner = p.add_subparsers(dest="stats_command", required=True)
    export = inner.add_parser(
        "export", help="write a month's record counts as an SDMX-ML 2.1 data message"
    )
    export.add_argument("--period", required=True, type=month,
                        help="the month, YYYY-MM (in the service's [stats] time_zone)")
    export.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    export.set_defaults(func=cmd_export)
    add_connection_flags(export)
    dsd = inner.add_parser("dsd", help="write the data structure definition (SDMX-ML 2.1)")
    dsd.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    dsd.set_defaults(func=cmd_dsd)
