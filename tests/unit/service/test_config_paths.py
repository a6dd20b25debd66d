"""Path keys of the configuration: relative to the file, or in systemd's credentials folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import ConfigError, parse

MINIMAL = {"database": {"url": "sqlite:////tmp/x.sqlite"}, "tls": {"enabled": False}}


def test_relative_paths_are_resolved_against_the_config_folder(tmp_path: Path) -> None:
    config = parse({**MINIMAL, "keystore": {"pin_file": "secrets/pin"}}, tmp_path)
    assert config.keystore.pin_file == str(tmp_path / "secrets" / "pin")


def test_credentials_directory_prefix_names_systemds_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/medvault@a.service")
    raw = {
        **MINIMAL,
        "keystore": {"pin_file": "$CREDENTIALS_DIRECTORY/pin"},
        "s3": {
            "access_key_file": "$CREDENTIALS_DIRECTORY/s3-access-key",
            "secret_key_file": "relative/s3-secret-key",
        },
    }
    config = parse(raw, tmp_path)
    assert config.keystore.pin_file == "/run/credentials/medvault@a.service/pin"
    assert config.s3.access_key_file == "/run/credentials/medvault@a.service/s3-access-key"
    assert config.s3.secret_key_file == str(tmp_path / "relative" / "s3-secret-key")


def test_credentials_directory_unset_is_refused_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    raw = {**MINIMAL, "keystore": {"pin_file": "$CREDENTIALS_DIRECTORY/pin"}}
    with pytest.raises(ConfigError, match=r"\[keystore\] pin_file names \$CREDENTIALS_DIRECTORY"):
        parse(raw, tmp_path)


def test_only_the_credentials_variable_is_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No general $VAR expansion: a path naming another variable stays a (relative) path."""
    monkeypatch.setenv("HOME", "/root")
    config = parse({**MINIMAL, "keystore": {"pin_file": "$HOME/pin"}}, tmp_path)
    assert config.keystore.pin_file == str(tmp_path / "$HOME" / "pin")


def test_a_path_key_of_the_wrong_type_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[keystore\] pin_file must be str"):
        parse({**MINIMAL, "keystore": {"pin_file": 7}}, tmp_path)
