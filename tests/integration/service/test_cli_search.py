"""``medvault ls`` filters and ``medvault studies`` as subprocesses against the shared server.

PYTEST_DONT_REWRITE: failures name counts and flags, never identifiers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests import content
from tests.fixtures.service import ROOT, RunningService
from tests.integration.service.streams import AUTHORITY, new_patient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _cli(service: RunningService, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT, env=service.cli_env(), capture_output=True, text=True, timeout=60,
        check=False,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-500:]}"
    return result.stdout


def _put(service: RunningService, patient: str, path: Path, kind: str) -> str:
    out = _ok(_cli(service, "put", str(path), "--patient", patient, "--authority", AUTHORITY,
                   "--kind", kind))
    return out.split()[1]


def test_ls_filters_and_studies(medvault_service: RunningService, tmp_path: Path) -> None:
    patient = new_patient().id
    study, series = str(generate_uid()), str(generate_uid())
    files = {}
    for n, modality in enumerate(("CT", "CT", "MR")):
        path = tmp_path / f"i{n}.dcm"
        path.write_bytes(content.dicom(patient, AUTHORITY, StudyInstanceUID=study,
                                       SeriesInstanceUID=series if n < 2 else str(generate_uid()),
                                       Modality=modality, StudyDate="20260707"))
        files[_put(medvault_service, patient, path, "DICOM")] = path
    note = tmp_path / "note.xml"
    note.write_bytes(content.cda(patient, AUTHORITY))
    cda_id = _put(medvault_service, patient, note, "CDA")

    def ls(*flags: str) -> set[str]:
        out = _ok(_cli(medvault_service, "ls", "--patient", patient, "--authority", AUTHORITY,
                       *flags))
        return {line.split()[0] for line in out.splitlines()}

    assert ls() == {*files, cda_id}
    assert ls("--modality", "MR") == {r for r, p in files.items() if p.name == "i2.dcm"}
    assert ls("--study", study) == set(files)
    assert ls("--series", series, "--modality", "CT") == {
        r for r, p in files.items() if p.name != "i2.dcm"}
    assert ls("--document-code", "18842-5") == {cda_id}
    assert ls("--date-from", "2026-07-07", "--date-to", "2026-07-07") == set(files)
    bad = _cli(medvault_service, "ls", "--patient", patient, "--authority", AUTHORITY,
               "--date-from", "July")
    assert bad.returncode != 0, "a bad date was accepted"
    assert "date_from" in bad.stderr, "the error does not name the field"
    assert "Traceback" not in bad.stderr, "a traceback was shown"

    listed = _ok(_cli(medvault_service, "studies", "--patient", patient, "--authority",
                      AUTHORITY)).splitlines()
    assert len(listed) == 1, f"{len(listed)} studies listed"
    assert listed[0].split()[:3] == [study, "2026-07-07", "CT,MR"], "study line"
    assert "2 series  3 instances" in listed[0], "study counts"

    out = tmp_path / "study"
    _ok(_cli(medvault_service, "studies", "--get", study, "-o", str(out)))
    saved = sorted(out.rglob("*.dcm"))
    assert len(saved) == 3, f"{len(saved)} instances saved"
    assert sorted(p.read_bytes() for p in saved) == sorted(
        p.read_bytes() for p in files.values()), "saved instances differ"
    assert all(p.stat().st_mode & 0o077 == 0 for p in saved), "instances readable by others"
    again = _cli(medvault_service, "studies", "--get", study, "-o", str(out))
    assert again.returncode == 1, "overwrote a saved study"
    assert "Traceback" not in again.stderr, "a traceback was shown"
