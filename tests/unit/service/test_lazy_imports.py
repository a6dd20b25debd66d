"""Start-up imports: pydicom and pynetdicom load with the first DICOM record or a
configured listener, and pydicom's value-quoting read validation is off on every path
that loads it; pyHanko loads with the first signature made or checked, and asn1crypto's
OID maps end as if it had loaded at start (service.signing.asn1_registry); Alembic
loads only to migrate. Each case runs in a fresh interpreter (this one has loaded
everything)."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms, tsp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydicom import dcmread
from pydicom.fileset import FileSet

from tests import content
from tests.fixtures.service import ROOT
from tests.unit.service.pyhanko_probe import HEAVY


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_the_server_module_loads_no_dicom_library() -> None:
    loaded = _run("import sys, service.server; print(sorted("
                  "m for m in ('pydicom', 'pynetdicom', 'numpy') if m in sys.modules))")
    assert loaded == "[]"


# service.server imports service.bootstrap (what the CLI's database commands use).
@pytest.mark.parametrize("module", ["service.server", "service.cli.main"])
def test_start_up_loads_no_pyhanko(module: str) -> None:
    loaded = _run(f"import sys, {module}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert loaded == "[]"


SIGNING_CERTIFICATE_V2 = "1.2.840.113549.1.9.16.2.47"  # RFC 5035, id-aa-signingCertificateV2


def _probe(mode: str) -> dict[str, Any]:
    """tests/unit/service/pyhanko_probe.py's result: one CAdES signature made and checked."""
    result: dict[str, Any] = json.loads(_run(
        f"from tests.unit.service.pyhanko_probe import main; main({mode!r})"
    ))  # fmt: skip
    return result


@pytest.fixture(scope="module")
def lazy() -> dict[str, Any]:
    return _probe("lazy")


def test_a_first_cades_signature_after_a_lazy_start_carries_signing_certificate_v2(
    lazy: dict[str, Any], tmp_path: Path
) -> None:
    """The hazard of docs/performance.md: pyHanko loaded by the first signature, after
    every asn1crypto name map was built, and the signature still names its certificate."""
    assert lazy["loaded_at_start"] == []
    assert set(lazy["loaded_after"]) == set(HEAVY) - {"service.signing.pades"}
    assert (lazy["valid"], lazy["reason"]) == (True, "")
    p7s = bytes.fromhex(lazy["p7s"])
    signed: Any = cms.ContentInfo.load(p7s)["content"]
    signed_attrs = signed["signer_infos"][0]["signed_attrs"]
    attributes = {a["type"].dotted: a["values"][0] for a in signed_attrs}
    certificate = signed["certificates"][0].chosen  # the signer's (the CA is not embedded)
    # By OID: what this interpreter names depends on what it has imported (the hazard).
    value = attributes[SIGNING_CERTIFICATE_V2].dump()
    binding = tsp.SigningCertificateV2.load(value)["certs"][0]
    assert binding["cert_hash"].native == hashlib.sha256(certificate.dump()).digest()
    ca = x509.load_der_x509_certificate(bytes.fromhex(lazy["ca"]))
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "sig.p7s").write_bytes(p7s)
    (tmp_path / "content.bin").write_bytes(bytes.fromhex(lazy["content"]))
    done = subprocess.run(
        ["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(tmp_path / "sig.p7s"),
         "-content", str(tmp_path / "content.bin"), "-CAfile", str(tmp_path / "ca.pem"),
         "-out", "/dev/null"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_asn1crypto_maps_end_as_if_pyhanko_had_loaded_at_start(lazy: dict[str, Any]) -> None:
    eager = _probe("eager")
    assert eager["loaded_at_start"] != []
    assert eager["valid"]
    assert lazy["maps"] == eager["maps"]


def test_a_database_at_head_is_opened_without_alembic(tmp_path: Path) -> None:
    """Every start runs ``upgrade``: Alembic loads only when there is something to migrate."""
    url = f"sqlite:///{tmp_path / 'metadata.db'}"
    code = ("import sys; from storage.sql_metadata import at_head, make_engine, upgrade; "
            f"engine = make_engine({url!r}); before = at_head(engine); upgrade(engine); "
            "print(before, at_head(engine), 'alembic' in sys.modules)")  # fmt: skip
    assert _run(code) == "False True True"  # an empty database: migrated by Alembic
    assert _run(code) == "True True False"  # at head: nothing to do, Alembic not loaded


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
