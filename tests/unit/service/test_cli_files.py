"""Files the CLI writes with patient data or signatures are created 0600."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.cli.files import create_private


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that would leave a file world-readable, so only the mode can protect it."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_file_is_owner_only(tmp_path: Path, open_umask: None) -> None:
    target = tmp_path / "record.bin"
    with create_private(target) as f:
        f.write(b"patient data")
    assert target.read_bytes() == b"patient data"
    assert _mode(target) == 0o600


def test_existing_file_is_truncated_and_narrowed(tmp_path: Path, open_umask: None) -> None:
    target = tmp_path / "sig.p7s"
    target.write_bytes(b"an older, longer signature")
    target.chmod(0o644)
    with create_private(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
    assert _mode(target) == 0o600


def test_exclusive_refuses_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "record.bin.partial"
    target.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        create_private(target, exclusive=True)
    assert not (tmp_path / "elsewhere").exists()
