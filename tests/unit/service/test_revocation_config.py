"""``[audit]`` settings of the grant revocation markers' refresh."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import ConfigError, parse
from tests.unit.service.test_audit_switch import BASE


def test_markers_are_refreshed_every_10_s_and_refused_after_120_s_by_default() -> None:
    audit = parse(BASE, Path()).audit
    assert (audit.revocation_refresh_seconds, audit.revocation_stale_seconds) == (10.0, 120.0)


@pytest.mark.parametrize(
    "section",
    [{"revocation_refresh_seconds": 0}, {"revocation_refresh_seconds": -1},
     {"revocation_refresh_seconds": 130},  # past the default stale bound
     {"revocation_stale_seconds": 5}, {"revocation_stale_seconds": 86401}],
)  # fmt: skip
def test_a_refresh_slower_than_the_stale_bound_is_refused(section: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=r"audit\.revocation_refresh_seconds"):
        parse({**BASE, "audit": {**BASE.get("audit", {}), **section}}, Path())
