"""Bulk import with the ``medvault`` CLI: ``put`` of folders and ``import-dicom`` of a CD.

PYTEST_DONT_REWRITE: a failed assertion shows no values, since they could look like
patient data.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from pydicom import dcmread
from pydicom.fileset import FileSet

from storage import ChainedEvent
from storage.audit_log import SqlAuditLog
from tests import content
from tests.fixtures.service import ROOT, RunningService
from tests.integration.service.streams import AUTHORITY, new_patient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

STORED = re.compile(r"^stored (\S+) -> ([0-9a-f]{32}) version 1 \(\d+ bytes\)$", re.M)


def _cli(service: RunningService, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT, env=service.cli_env(), capture_output=True, text=True, timeout=120,
        check=False,
    )


def _events_after(database_url: str, sequence: int) -> list[ChainedEvent]:
    engine = sa.create_engine(database_url)
    try:
        return list(SqlAuditLog(engine).events(sequence, limit=100_000))
    finally:
        engine.dispose()


def _head(database_url: str) -> int:
    engine = sa.create_engine(database_url)
    try:
        return int(SqlAuditLog(engine).head()[0])
    finally:
        engine.dispose()


def _listed(service: RunningService, patient: str) -> list[str]:
    result = _cli(service, "ls", "--patient", patient, "--authority", AUTHORITY)
    assert result.returncode == 0, f"ls failed: {result.stderr[-300:]}"
    return result.stdout.splitlines()


def test_bulk_put_of_a_folder_stores_the_good_and_names_each_refusal(
    medvault_service: RunningService, database_url: str, tmp_path: Path
) -> None:
    patient = new_patient().id
    folder = tmp_path / "export"
    (folder / "imaging" / "ct").mkdir(parents=True)
    good = {
        folder / "summary.xml": content.cda(patient, AUTHORITY),
        folder / "lab.hl7": content.hl7v2(patient, AUTHORITY),
        folder / "obs.json": content.fhir(patient, AUTHORITY),
        folder / "letter.pdf": content.pdf(),
        folder / "imaging" / "ct" / "img1": content.dicom(patient, AUTHORITY),
    }
    for path, data in good.items():
        path.write_bytes(data)
    (folder / "notes.txt").write_bytes(b"plain text, no kind\n")  # refused here
    (folder / "broken.pdf").write_bytes(b"%PDF-1.7\nno trailer\n")  # refused by the server
    head = _head(database_url)

    result = _cli(medvault_service, "put", str(folder), "--patient", patient,
                  "--authority", AUTHORITY, "--kind", "auto")  # fmt: skip

    assert result.returncode == 1, "a bulk put with refusals exits 0"
    stored = dict(STORED.findall(result.stdout))
    assert set(stored) == {str(p) for p in good}, "the stored files differ from the good ones"
    assert "stored 5, already stored 0, refused 2" in result.stdout, "summary counts are wrong"
    summary = result.stdout[result.stdout.index("stored 5, already"):]
    assert f"refused {folder / 'notes.txt'}: kind not recognised" in summary, (
        "the unrecognised file's reason is not in the summary")
    assert f"refused {folder / 'broken.pdf'}: INVALID_ARGUMENT: content" in summary, (
        "the server's refusal is not in the summary")
    kinds = sorted(line.split()[2] for line in _listed(medvault_service, patient))
    assert kinds == ["CDA", "DICOM", "FHIR", "HL7V2", "PDF"], "ls shows other kinds"

    writes = [e.entry for e in _events_after(database_url, head)
              if e.entry.action == "records.write"]  # fmt: skip
    allowed = {w.resource.split("/")[1] for w in writes if w.outcome == "allowed"}
    assert set(stored.values()) <= allowed, "a stored file has no allowed write event"
    refused = [w for w in writes if w.outcome != "allowed" and w.status == "INVALID_ARGUMENT"]
    assert refused, "the server's refusal is not audited"
    assert {w.principal for w in writes} == {"test-app"}, "a put is audited under another name"


def test_single_file_put_is_unchanged(medvault_service: RunningService, tmp_path: Path) -> None:
    source = tmp_path / "one.pdf"
    source.write_bytes(content.pdf())
    result = _cli(medvault_service, "put", str(source), "--patient", new_patient().id,
                  "--authority", AUTHORITY, "--kind", "PDF")  # fmt: skip
    assert result.returncode == 0, f"exit {result.returncode}"
    assert re.fullmatch(r"stored [0-9a-f]{32} version 1 \(\d+ bytes\)\n", result.stdout), (
        "single-file output changed")


def _cd(root: Path, patients: list[str], per_patient: int = 2) -> Path:
    """A patient CD: a DICOMDIR written with pydicom's FileSet, and a viewer beside it."""
    fileset = FileSet()
    for patient in patients:
        for number in range(per_patient):
            data = content.dicom(patient, AUTHORITY, StudyTime="120000", StudyID="1",
                                 SeriesNumber=1, InstanceNumber=number + 1)  # fmt: skip
            fileset.add(dcmread(io.BytesIO(data)))
    fileset.write(root)
    (root / "viewer.exe").write_bytes(b"MZ not dicom")  # not listed in the DICOMDIR
    return root / "DICOMDIR"


def test_import_dicom_files_each_instance_under_its_patient_once(
    medvault_service: RunningService, database_url: str, tmp_path: Path
) -> None:
    first, second = new_patient().id, new_patient().id
    dicomdir = _cd(tmp_path / "cd", [first, second])
    head = _head(database_url)

    result = _cli(medvault_service, "import-dicom", str(dicomdir))
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-300:]}"
    assert "stored 4, already stored 0, refused 0" in result.stdout, "first import summary"
    for patient in (first, second):
        lines = _listed(medvault_service, patient)
        assert len(lines) == 2, "a patient does not have their two instances"
        assert all(" DICOM " in line for line in lines), "an instance is not DICOM"
    writes = [e.entry for e in _events_after(database_url, head)
              if e.entry.action == "records.write"]  # fmt: skip
    assert len(writes) == 4, "not one write event per instance"
    assert {(w.principal, w.outcome) for w in writes} == {("test-app", "allowed")}, (
        "an import is audited under another name or outcome")

    again = _cli(medvault_service, "import-dicom", str(dicomdir.parent))  # the CD's root
    assert again.returncode == 0, f"exit {again.returncode}: {again.stderr[-300:]}"
    assert "stored 0, already stored 4, refused 0" in again.stdout, "a re-run stored again"
    for patient in (first, second):
        assert len(_listed(medvault_service, patient)) == 2, "a re-run added a record"


def test_import_dicom_refuses_instances_of_another_patient(
    medvault_service: RunningService, database_url: str, tmp_path: Path
) -> None:
    mine, other = new_patient().id, new_patient().id
    dicomdir = _cd(tmp_path / "cd", [mine, other], per_patient=1)
    head = _head(database_url)

    result = _cli(medvault_service, "import-dicom", str(dicomdir), "--patient", mine,
                  "--authority", AUTHORITY)  # fmt: skip

    assert result.returncode == 1, "a mismatch did not make the import fail"
    assert "stored 1, already stored 0, refused 1" in result.stdout, "summary counts"
    refusal = next(line for line in result.stdout.splitlines()
                   if line.startswith("refused "))  # fmt: skip
    assert "INVALID_ARGUMENT" in refusal, "the refusal does not say why"
    assert other not in result.stdout + result.stderr, "output echoes the other patient"
    assert len(_listed(medvault_service, mine)) == 1, "the matching instance is not stored"
    assert _listed(medvault_service, other) == [], "the other patient's instance was stored"
    writes = [e.entry for e in _events_after(database_url, head)
              if e.entry.action == "records.write"]  # fmt: skip
    outcomes = sorted((w.outcome == "allowed", w.status) for w in writes)
    assert outcomes == [(False, "INVALID_ARGUMENT"), (True, "")], (
        "the mismatch is not audited as a refused write")


def test_import_dicom_of_a_folder_does_not_follow_a_symbolic_link_out_of_it(
    medvault_service: RunningService, tmp_path: Path
) -> None:
    """A folder (a USB stick, an unpacked CD) links to a file elsewhere on the machine:
    the link is named as skipped and the file it points at is not read or sent."""
    patient = new_patient().id
    folder, elsewhere = tmp_path / "stick", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    (folder / "img1").write_bytes(content.dicom(patient, AUTHORITY))
    outside = elsewhere / "img2"
    outside.write_bytes(content.dicom(patient, AUTHORITY))
    (folder / "img2").symlink_to(outside)
    (folder / "sub").symlink_to(elsewhere, target_is_directory=True)

    result = _cli(medvault_service, "import-dicom", str(folder))

    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-300:]}"
    assert "stored 1, already stored 0, refused 0" in result.stdout, "a link was followed"
    assert f"skipped {folder / 'img2'}: a symbolic link, not followed" in result.stderr, (
        "the link is not named as skipped")
    assert len(_listed(medvault_service, patient)) == 1, "the linked file was stored"
