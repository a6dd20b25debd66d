"""Pkcs11Config: where the PIN comes from, and refusing PIN files others can read."""

from __future__ import annotations

import os
import secrets
import struct
from pathlib import Path

import pytest

from keystore import PinError, Pkcs11Config


def _config(pin_file: Path | None = None, pin_env: str | None = None) -> Pkcs11Config:
    return Pkcs11Config(
        module_path="/nonexistent.so",
        token_label="t",
        pin_env=pin_env,
        pin_file=str(pin_file) if pin_file else None,
    )


def _pin_file(tmp_path: Path, mode: int) -> tuple[Path, str]:
    pin = secrets.token_urlsafe(12)
    path = tmp_path / "pin"
    path.write_text(pin + "\n", encoding="utf-8")
    path.chmod(mode)
    return path, pin


def test_environment_variable_wins_over_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = _pin_file(tmp_path, 0o600)
    env_pin = secrets.token_urlsafe(12)
    monkeypatch.setenv("MEDVAULT_TEST_PIN_ENV", env_pin)
    assert _config(path, "MEDVAULT_TEST_PIN_ENV").read_pin() == env_pin


def test_file_used_when_environment_variable_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, pin = _pin_file(tmp_path, 0o600)
    monkeypatch.delenv("MEDVAULT_TEST_PIN_ENV", raising=False)
    assert _config(path, "MEDVAULT_TEST_PIN_ENV").read_pin() == pin


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_shared_pin_file_is_refused(tmp_path: Path, mode: int) -> None:
    path, pin = _pin_file(tmp_path, mode)
    with pytest.raises(PinError) as caught:
        _config(path).read_pin()
    message = str(caught.value)
    assert str(path) in message
    assert "chmod 600" in message
    assert pin not in message


def test_no_pin_source_names_where_to_put_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDVAULT_TEST_PIN_ENV", raising=False)
    with pytest.raises(PinError, match="MEDVAULT_TEST_PIN_ENV"):
        _config(pin_env="MEDVAULT_TEST_PIN_ENV").read_pin()


def test_missing_pin_file(tmp_path: Path) -> None:
    with pytest.raises(PinError, match="cannot be read"):
        _config(tmp_path / "absent").read_pin()


def test_pool_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="pool_size"):
        Pkcs11Config(module_path="m", token_label="t", pool_size=0)


def _set_acl(path: Path, *entries: tuple[int, int, int]) -> None:
    """Give ``path`` a POSIX ACL (Linux's xattr form: version 2, then tag/perm/id)."""
    raw = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, 0xFFFFFFFF if ident < 0 else ident)
        for tag, perm, ident in entries
    )
    try:
        os.setxattr(path, "system.posix_acl_access", raw)
    except OSError as e:
        pytest.fail(f"the test folder's file system refuses POSIX ACLs ({e.strerror})")


USER_OBJ, USER, GROUP_OBJ, MASK, OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
READ = 4


def test_systemd_credential_readable_through_an_acl_is_accepted(tmp_path: Path) -> None:
    """systemd's LoadCredential= grants the unit's user read access by an ACL entry on
    file systems that have ACLs: the mode then shows 0440 (the ACL mask), though no group
    can read the PIN. Only this user and the owner can: accepted."""
    path, pin = _pin_file(tmp_path, 0o400)
    _set_acl(path, (USER_OBJ, READ, -1), (USER, READ, os.getuid()), (GROUP_OBJ, 0, -1),
             (MASK, READ, -1), (OTHER, 0, -1))  # fmt: skip
    assert path.stat().st_mode & 0o777 == 0o440
    assert _config(pin_file=path).read_pin() == pin


@pytest.mark.parametrize(
    "shared",
    [(USER, READ, 4242), (GROUP_OBJ, READ, -1)],
    ids=["another-user", "the-group"],
)
def test_acl_letting_someone_else_read_is_refused(
    tmp_path: Path, shared: tuple[int, int, int]
) -> None:
    path, _ = _pin_file(tmp_path, 0o400)
    entries = {USER_OBJ: (USER_OBJ, READ, -1), GROUP_OBJ: (GROUP_OBJ, 0, -1)}
    entries[shared[0]] = shared
    _set_acl(path, *sorted(entries.values()), (MASK, READ, -1), (OTHER, 0, -1))
    with pytest.raises(PinError, match="readable by group or others"):
        _config(pin_file=path).read_pin()


def test_pin_file_of_another_user_is_refused(tmp_path: Path) -> None:
    """Attack: a 0600 PIN file that belongs to another (unprivileged) account. A service
    running as root reads it, yet that account can read and replace the PIN at will.
    Only this user's files, or root's (systemd's credentials), are accepted. The owner is
    changed with chown, which needs root: the situation only arises for a root process."""
    if os.geteuid() != 0:
        pytest.fail("this test gives the PIN file another owner (chown): run it as root")
    path, pin = _pin_file(tmp_path, 0o600)
    os.chown(path, 4242, 4242)
    with pytest.raises(PinError, match="belongs to uid 4242") as caught:
        _config(pin_file=path).read_pin()
    assert pin not in str(caught.value)
    os.chown(path, 0, 0)  # root's own file (a systemd credential): accepted
    assert _config(pin_file=path).read_pin() == pin
