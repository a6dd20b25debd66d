"""SDMX-ML 2.1 for the SDMX-HD statistics export (docs/statistics.md).

``medvault-records-dsd.xml`` beside this module is the structure message (code lists,
concepts, the data structure definition and its dataflow); :func:`data_message` writes
a StructureSpecificData message against it from the service's counts. Written with
lxml: the structure is small and fixed, and the tests read the result back with an
independent implementation (the ``sdmx1`` package) against the shipped definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from lxml import etree

AGENCY = "MEDVAULT"
DSD_ID = "DSD_MEDVAULT_RECORDS"
DATAFLOW_ID = "DF_MEDVAULT_RECORDS"
VERSION = "1.0"
DSD_FILE = "medvault-records-dsd.xml"
FREQ_MONTHLY = "M"
CONF_FREE = "F"  # SDMX cross-domain CL_CONF_STATUS: free
CONF_CONFIDENTIAL = "C"  # confidential statistical information: the value is withheld

_SDMX = "http://www.sdmx.org/resources/sdmxml/schemas/v2_1/"
MESSAGE = _SDMX + "message"
COMMON = _SDMX + "common"
SS = _SDMX + "data/structurespecific"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
DSD_URN = f"urn:sdmx:org.sdmx.infomodel.datastructure.DataStructure={AGENCY}:{DSD_ID}({VERSION})"
# The namespace of the DSD-specific schema, as SDMX 2.1 derives it (section 3.3.2 of the
# SDMX-ML structure-specific guidelines), with the time dimension at the observation.
DATA_NAMESPACE = f"{DSD_URN}:ObsLevelDim:TIME_PERIOD"
STRUCTURE_REF = f"{AGENCY}_{DSD_ID}_{VERSION.replace('.', '_')}"


@dataclass(frozen=True, slots=True)
class Cell:
    """One observation: a record kind's count, or None when withheld."""

    kind: str  # a code of CL_RECORD_KIND
    count: int | None


def structure_message() -> bytes:
    """The shipped SDMX-ML 2.1 structure message (the DSD and what it refers to)."""
    return resources.files(__package__).joinpath(DSD_FILE).read_bytes()


def message_id(facility: str, period: str, prepared: datetime) -> str:
    """An SDMX IDType for one export (letters, digits, ``_``, ``-``)."""
    return f"MEDVAULT_{facility}_{period}_{prepared.astimezone(UTC):%Y%m%dT%H%M%SZ}"


def _sub(parent: Any, tag: str, text: str | None = None, **attrib: str) -> Any:
    element = etree.SubElement(parent, tag, attrib)
    if text is not None:
        element.text = text
    return element


def _header(root: Any, facility: str, period: str, prepared: datetime) -> None:
    m = f"{{{MESSAGE}}}"
    header = _sub(root, m + "Header")
    _sub(header, m + "ID", message_id(facility, period, prepared))
    _sub(header, m + "Test", "false")
    _sub(header, m + "Prepared", prepared.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    _sub(header, m + "Sender", id=facility)
    structure = _sub(
        header, m + "Structure", structureID=STRUCTURE_REF, namespace=DATA_NAMESPACE,
        dimensionAtObservation="TIME_PERIOD",
    )  # fmt: skip
    ref = _sub(structure, f"{{{COMMON}}}Structure")
    _sub(ref, "Ref", agencyID=AGENCY, id=DSD_ID, version=VERSION)


def data_message(
    facility: str, period: str, cells: Sequence[Cell], prepared: datetime
) -> bytes:
    """A StructureSpecificData message: one series per kind, one observation each.

    A withheld cell keeps its observation, flagged ``CONF_STATUS="C"`` with no
    ``OBS_VALUE`` (SDMX practice for primary confidentiality), so a reader can tell
    "fewer than the threshold" from "no data".
    """
    nsmap = {"message": MESSAGE, "common": COMMON, "ss": SS, "xsi": XSI, "ns1": DATA_NAMESPACE}
    root = etree.Element(f"{{{MESSAGE}}}StructureSpecificData", nsmap=nsmap)
    _header(root, facility, period, prepared)
    dataset = etree.SubElement(root, f"{{{MESSAGE}}}DataSet", {
        f"{{{SS}}}structureRef": STRUCTURE_REF,
        f"{{{SS}}}dataScope": "DataStructure",
        f"{{{XSI}}}type": "ns1:DataSetType",
    })  # fmt: skip
    for cell in cells:
        # Series and Obs are unqualified: their type comes from the DSD-specific schema.
        series = _sub(dataset, "Series", FREQ=FREQ_MONTHLY, FACILITY=facility,
                      RECORD_KIND=cell.kind)  # fmt: skip
        if cell.count is None:
            _sub(series, "Obs", TIME_PERIOD=period, CONF_STATUS=CONF_CONFIDENTIAL)
        else:
            _sub(series, "Obs", TIME_PERIOD=period, OBS_VALUE=str(cell.count),
                 CONF_STATUS=CONF_FREE)  # fmt: skip
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True))
