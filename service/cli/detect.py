"""``--kind auto``: a record's kind told from the first bytes of its content.

Only a routing guess: the server still checks the content against the kind it is given,
so a file that looks like a kind but is not one is refused there with the precise reason.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from service.cli.bulk import RefusedError

PREFIX = 64 << 10
FHIR_MAX_BYTES = 8 << 20  # the server's FHIR limit (storage/formats/fhir.py)
_CDA_ROOT = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?ClinicalDocument[\s/>]")
_NOT_RECOGNISED = (
    "kind not recognised: not DICOM (no DICM preamble), HL7 v2 (MSH|), PDF (%PDF-), "
    "CDA (ClinicalDocument XML) or FHIR (JSON with resourceType); give --kind"
)


def _fhir(path: Path) -> bool:
    if path.stat().st_size > FHIR_MAX_BYTES:
        raise RefusedError(f"JSON larger than {FHIR_MAX_BYTES} bytes (the FHIR limit)")
    try:
        document = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(document, dict) and isinstance(document.get("resourceType"), str)


def detect_kind(path: Path) -> str:
    """The RecordKind name (``DICOM``, ``HL7V2``, ...) of a file; RefusedError if none."""
    with path.open("rb") as f:
        head = f.read(PREFIX)
    if head[128:132] == b"DICM":
        return "DICOM"
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if text.startswith(b"MSH|"):
        return "HL7V2"
    if text.startswith(b"%PDF-"):
        return "PDF"
    if text.startswith(b"<") and _CDA_ROOT.search(text):
        return "CDA"
    if text.startswith(b"{") and _fhir(path):
        return "FHIR"
    raise RefusedError(_NOT_RECOGNISED)
