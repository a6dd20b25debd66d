"""The statistics export's configuration and SDMX-ML writer (no server)."""

from __future__ import annotations

import argparse
import io
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sdmx
from lxml import etree

from service.cli import sdmx as writer
from service.cli.stats_cmd import month
from service.config import ConfigError, StatsConfig, parse

DATABASE = {"database": {"url": "sqlite:///x.db"}, "tls": {"enabled": False}}


def test_defaults_leave_the_facility_unset_and_withhold_under_five() -> None:
    config = parse(DATABASE, Path())
    assert config.stats == StatsConfig(facility="", time_zone="UTC", min_cell=5)


@pytest.mark.parametrize(("key", "value", "named"), [
    ("facility", "79 001", "stats.facility"),
    ("facility", "x" * 21, "stats.facility"),
    ("time_zone", "Mars/Olympus", "stats.time_zone"),
    ("min_cell", 0, "stats.min_cell"),
    ("threshold", 5, "unknown key 'threshold'"),
])  # fmt: skip
def test_bad_stats_settings_are_refused_naming_the_key(key: str, value: object, named: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse({**DATABASE, "stats": {key: value}}, Path())
    assert named in str(raised.value)


def test_cli_period_must_be_a_month() -> None:
    assert month("2026-10") == "2026-10"
    with pytest.raises(argparse.ArgumentTypeError):
        month("2026-13")


def test_a_withheld_cell_has_no_value_and_is_flagged_confidential() -> None:
    cells = [writer.Cell("CDA", 12), writer.Cell("PDF", None), writer.Cell("OTHER", 0)]
    prepared = datetime(2026, 11, 2, 8, 30, tzinfo=UTC)
    data = writer.data_message("79001", "2026-10", cells, prepared)
    root = etree.fromstring(data)
    obs = {o.getparent().get("RECORD_KIND"): dict(o.attrib) for o in root.iter("Obs")}
    assert obs == {
        "CDA": {"TIME_PERIOD": "2026-10", "OBS_VALUE": "12", "CONF_STATUS": "F"},
        "PDF": {"TIME_PERIOD": "2026-10", "CONF_STATUS": "C"},
        "OTHER": {"TIME_PERIOD": "2026-10", "OBS_VALUE": "0", "CONF_STATUS": "F"},
    }
    header = sdmx.read_sdmx(
        io.BytesIO(data),
        structure=sdmx.read_sdmx(io.BytesIO(writer.structure_message())).structure[writer.DSD_ID],
    ).header
    assert header.id == "MEDVAULT_79001_2026-10_20261102T083000Z"
    assert header.sender.id == "79001"


def test_shipped_data_schema_has_the_dsd_codes_and_namespace() -> None:
    xs = "{http://www.w3.org/2001/XMLSchema}"
    schema = etree.parse(str(Path(writer.__file__).parent / "medvault-records-data.xsd"))
    assert schema.getroot().get("targetNamespace") == writer.DATA_NAMESPACE
    enumerations = {
        simple.get("name"): {e.get("value") for e in simple.iter(f"{xs}enumeration")}
        for simple in schema.getroot().iter(f"{xs}simpleType")
    }
    structures = sdmx.read_sdmx(io.BytesIO(writer.structure_message()))
    for codelist in ("CL_FREQ", "CL_RECORD_KIND", "CL_CONF_STATUS"):
        codes = {code.id for code in structures.codelist[codelist]}
        assert enumerations[f"{codelist}Type"] == codes, codelist
