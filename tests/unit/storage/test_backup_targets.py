"""DirectoryTarget: atomic writes, listing, key validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.backup import BackupError
from storage.backup.targets import DirectoryTarget
from storage.errors import RecordNotFoundError


def test_put_read_list_delete(tmp_path: Path) -> None:
    target = DirectoryTarget(tmp_path)
    assert target.put("objects/ab", [b"he", b"llo"]) == 5
    assert target.stat("objects/ab") == 5
    assert target.stat("objects/cd") is None
    assert b"".join(target.read("objects/ab")) == b"hello"
    target.put("manifests/x.json", [b"{}"])
    assert list(target.list("objects/")) == ["objects/ab"]
    assert list(target.list("")) == ["manifests/x.json", "objects/ab"]
    target.delete("objects/ab")
    target.delete("objects/ab")
    with pytest.raises(RecordNotFoundError):
        list(target.read("objects/ab"))


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    target = DirectoryTarget(tmp_path)

    def broken():  # type: ignore[no-untyped-def]
        yield b"part"
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError):
        target.put("objects/ab", broken())
    assert target.stat("objects/ab") is None
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("key", ["", "/etc/x", "a/../b", "a//b", "objects/.tmp-x"])
def test_bad_keys(tmp_path: Path, key: str) -> None:
    with pytest.raises(BackupError):
        DirectoryTarget(tmp_path).stat(key)
