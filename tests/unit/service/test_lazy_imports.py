"""Start-up imports: pydicom and pynetdicom load with the first DICOM record or a
configured listener, and pydicom's value-quoting read validation is off on every path
that loads it. Each case runs in a fresh interpreter (this one has loaded everything)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.fileset import FileSet

from tests import content
from tests.fixtures.service import ROOT


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_the_server_module_loads_no_dicom_library() -> None:
    loaded = _run("import sys, service.server; print(sorted("
                  "m for m in ('pydicom', 'pynetdicom', 'numpy') if m in sys.modules))")
    assert loaded == "[]"


QUIET = ("from pydicom import config; "
         "print(config.settings.reading_validation_mode == config.IGNORE)")


@pytest.mark.parametrize("path", [
    # the DICOM listener (and import-dicom), before any record validator exists
    "import service.dicom",
    "import service.dicom.scp",
    # the first DICOM record's validator
    "from storage.formats import validator_for; from storage.model import PatientRef, "
    "RecordKind; validator_for(RecordKind.DICOM, PatientRef('P-1', 'urn:oid:1.2.3'))",
])  # fmt: skip
def test_pydicom_never_quotes_values_whichever_path_loads_it(path: str) -> None:
    assert _run(f"{path}; {QUIET}") == "True"


def test_import_dicom_reads_a_cds_dicomdir_without_quoting_its_values(tmp_path: Path) -> None:
    """``medvault import-dicom`` reads the DICOMDIR before any instance: a value there
    that breaks its VR's rules (a burner's File-set ID made of the patient's name, and
    written with the VR IS) must not reach the CLI's log, which is its stderr."""
    fileset = FileSet()
    fileset.ID = "PLACEHOLDER0ABCD"
    data = content.dicom("P-1", "urn:oid:1.2.3", StudyTime="120000", StudyID="1",
                         SeriesNumber=1, InstanceNumber=1)  # fmt: skip
    fileset.add(dcmread(io.BytesIO(data)))
    fileset.write(tmp_path)
    dicomdir = tmp_path / "DICOMDIR"
    written = dicomdir.read_bytes()
    at = written.index(b"PLACEHOLDER0ABCD")
    assert written[at - 4 : at] == b"CS\x10\x00"  # explicit VR: VR, then the length
    dicomdir.write_bytes(written[: at - 4] + b"IS\x10\x00Jane Doe 1970 01" + written[at + 16 :])
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from service import logs; "
         "from service.cli.import_cmd import instances; logs.setup('INFO'); "
         "print(len(instances(Path(sys.argv[1]))))", str(dicomdir)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "1"
    assert "Jane" not in done.stdout + done.stderr, "a DICOMDIR value in the CLI's log"
