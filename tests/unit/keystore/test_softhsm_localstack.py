"""service.localstack.softhsm: the local token helpers are idempotent and keep PINs private."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from service.localstack.softhsm import (
    SoftHsmError,
    ensure_pin_file,
    init_token,
    token_labels,
    write_softhsm_conf,
)


def test_conf_points_at_project_local_tokens(tmp_path: Path) -> None:
    conf = write_softhsm_conf(tmp_path)
    assert conf == tmp_path / "softhsm" / "softhsm2.conf"
    text = conf.read_text(encoding="utf-8")
    assert f"directories.tokendir = {(tmp_path / 'softhsm' / 'tokens').resolve()}" in text
    assert "objectstore.backend = file" in text
    assert "log.level = ERROR" in text
    assert write_softhsm_conf(tmp_path) == conf
    assert conf.read_text(encoding="utf-8") == text


def test_pin_file_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "state" / "user.pin"
    pin = ensure_pin_file(path)
    assert len(pin) >= 16
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_pin_file(path) == pin


def test_shared_pin_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "user.pin"
    ensure_pin_file(path)
    path.chmod(0o644)
    with pytest.raises(SoftHsmError, match="chmod 600"):
        ensure_pin_file(path)


def test_init_token_is_idempotent(tmp_path: Path) -> None:
    conf = write_softhsm_conf(tmp_path)
    pin = ensure_pin_file(tmp_path / "user.pin")
    so_pin = ensure_pin_file(tmp_path / "so.pin")
    assert init_token(conf, "medvault-local", pin, so_pin) is True
    assert init_token(conf, "medvault-local", pin, so_pin) is False
    assert token_labels(conf).count("medvault-local") == 1


def test_init_token_failure_does_not_echo_pins(tmp_path: Path) -> None:
    conf = write_softhsm_conf(tmp_path)
    bad_pin = "x"  # too short for SoftHSM2, so softhsm2-util fails
    with pytest.raises(SoftHsmError) as caught:
        init_token(conf, "medvault-bad", bad_pin, "so-pin-never-shown")
    assert "so-pin-never-shown" not in str(caught.value)
