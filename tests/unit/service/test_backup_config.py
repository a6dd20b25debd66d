"""``[backup]`` settings of the drills: workers and the scheduled drill's sample."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import ConfigError, parse
from tests.unit.service.test_audit_switch import BASE


def test_scheduled_drills_are_full_unless_a_confidence_is_set() -> None:
    config = parse(BASE, Path())
    assert (config.backup.drill_sample_confidence, config.backup.drill_max_defect_rate) == (
        0.0, 0.01,
    )  # fmt: skip
    assert config.backup.workers == 4
    section = {"drill_sample_confidence": 0.99, "drill_max_defect_rate": 0.001, "workers": 8}
    sampled = parse({**BASE, "backup": section}, Path())
    assert sampled.backup.drill_sample_confidence == 0.99
    assert sampled.backup.workers == 8


@pytest.mark.parametrize(
    ("section", "named"),
    [({"drill_sample_confidence": 1.0}, "drill_sample_confidence"),
     ({"drill_sample_confidence": 0.2}, "drill_sample_confidence"),
     ({"drill_max_defect_rate": 0.0}, "drill_max_defect_rate"),
     ({"drill_max_defect_rate": 1}, "drill_max_defect_rate"),
     ({"workers": 0}, "workers"), ({"workers": 65}, "workers")],
)  # fmt: skip
def test_bad_drill_settings_are_refused_naming_the_key(
    section: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigError, match=f"backup.{named}"):
        parse({**BASE, "backup": section}, Path())
