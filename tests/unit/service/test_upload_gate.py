"""The global cap on uploads streaming at once (service.limits.UploadGate, server.max_uploads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import ConfigError, parse
from service.limits import UploadGate, UploadsBusyError
from tests.unit.service.test_audit_switch import BASE


def test_gate_refuses_beyond_its_cap_and_frees_slots() -> None:
    gate = UploadGate(2)
    with gate.slot(), gate.slot(), pytest.raises(UploadsBusyError), gate.slot():
        pass  # pragma: no cover
    with gate.slot(), gate.slot():  # both slots were given back, also by the refused one
        pass


def test_default_cap_is_workers_and_must_stay_below_the_pool() -> None:
    config = parse({**BASE, "server": {"workers": 4}}, Path())
    assert config.server.upload_cap == 4
    most = parse({**BASE, "server": {"workers": 4, "max_uploads": 7}}, Path())
    assert most.server.upload_cap == 7
    for bad in (8, -1):
        with pytest.raises(ConfigError, match="max_uploads"):
            parse({**BASE, "server": {"workers": 4, "max_uploads": bad}}, Path())
