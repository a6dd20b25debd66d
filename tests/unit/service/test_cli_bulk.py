"""``--kind auto`` detection and the bulk summary, without a server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service._gen.medvault.v1 import records_pb2 as pb
from service.cli import bulk
from service.cli.detect import FHIR_MAX_BYTES, detect_kind
from tests import content

AUTHORITY = "urn:oid:2.999.42.1"


@pytest.mark.parametrize(("kind", "data"), [
    ("DICOM", content.dicom("P1", AUTHORITY)),
    ("HL7V2", content.hl7v2("P1", AUTHORITY)),
    ("PDF", content.pdf()),
    ("CDA", content.cda("P1", AUTHORITY)),
    ("FHIR", content.fhir("P1", AUTHORITY)),
    ("FHIR", b"\xef\xbb\xbf " + content.fhir("P1", AUTHORITY)),
])  # fmt: skip
def test_detects_each_kind(tmp_path: Path, kind: str, data: bytes) -> None:
    path = tmp_path / "f"
    path.write_bytes(data)
    assert detect_kind(path) == kind


@pytest.mark.parametrize("data", [
    b"plain text\n",
    b"",
    b'{"no": "resourceType"}',
    b"[1, 2]",
    b"<html><body>ClinicalDocument</body></html>",
    b"\0" * 128 + b"DICX",
])  # fmt: skip
def test_refuses_what_it_cannot_tell(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "f"
    path.write_bytes(data)
    with pytest.raises(bulk.RefusedError, match="kind not recognised"):
        detect_kind(path)


def test_refuses_json_over_the_fhir_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"resourceType": "Bundle", "pad": "x" * FHIR_MAX_BYTES}))
    with pytest.raises(bulk.RefusedError, match="FHIR limit"):
        detect_kind(path)


def test_files_under_recurses_in_order(tmp_path: Path) -> None:
    (tmp_path / "b" / "c").mkdir(parents=True)
    for name in ("b/c/3", "b/2", "a"):
        (tmp_path / name).write_bytes(b"x")
    found = bulk.files_under([str(tmp_path / "b"), str(tmp_path / "a")])
    assert found == [tmp_path / "b/2", tmp_path / "b/c/3", tmp_path / "a"]
    with pytest.raises(SystemExit, match="no such file"):
        bulk.files_under([str(tmp_path / "missing")])


def test_summary_counts_and_names_each_refusal() -> None:
    record = pb.Record(id="0" * 32, version=1)
    outcomes = [
        bulk.Outcome(Path("a"), record=record),
        bulk.Outcome(Path("b"), record=record, earlier=True),
        bulk.Outcome(Path("c"), reason="INVALID_ARGUMENT: content: not PDF"),
        bulk.Outcome(Path("d"), reason="not DICOM", skipped=True),
    ]
    assert bulk.summary(outcomes) == [
        "stored 1, already stored 1, refused 1, skipped 1",
        "refused c: INVALID_ARGUMENT: content: not PDF",
    ]
