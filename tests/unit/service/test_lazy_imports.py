"""Start-up imports: pydicom and pynetdicom load with the first DICOM record or a
configured listener, and pydicom's value-quoting read validation is off on every path
that loads it. Each case runs in a fresh interpreter (this one has loaded everything)."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
