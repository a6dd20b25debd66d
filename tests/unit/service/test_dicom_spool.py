"""The DICOM spool: sealed, nameless files of bounded size in a folder of the service's.

What is on the disk is read the way a local attacker would (through ``/proc/<pid>/fd``,
as the files have no name), and must hold none of the bytes written.
"""

from __future__ import annotations

import gc
import os
import resource
import stat
import threading
from pathlib import Path

import pytest

from service.config import ConfigError
from service.dicom.scp import instance_patient
from service.dicom.sealed_file import CHUNK, SealedFile, SpoolIntegrityError
from service.dicom.spool import BoundedSpool, SpoolError, prepare, received, release
from storage import PatientRef
from tests import content

MARK = b"PATIENT^SYNTHETIC^0417"


def _open_in(folder: Path) -> list[Path]:
    """The files this process holds open in ``folder`` (named or not), by /proc."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"{folder}/"):
                found.append(Path(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed meanwhile
            continue
    return found


def _on_disk(folder: Path) -> list[bytes]:
    """What those files hold."""
    return [path.read_bytes() for path in _open_in(folder)]


def _data(size: int) -> bytes:
    body = bytearray(os.urandom(size))
    for at in range(0, size - len(MARK), 50_000):
        body[at : at + len(MARK)] = MARK
    return bytes(body)


def test_a_sealed_file_reads_back_what_was_written_and_keeps_nothing_in_clear(
    tmp_path: Path,
) -> None:
    data = _data(3 * CHUNK + 1234)
    sealed = SealedFile(tmp_path)
    try:
        for at in range(0, len(data), 7000):  # pieces across the chunk boundaries
            sealed.append(data[at : at + 7000])
        sealed.flush()
        assert list(tmp_path.iterdir()) == [], "the spool file has a name"
        [disk] = _on_disk(tmp_path)
        assert len(disk) == len(data) + 4 * 16, "chunks and tags"
        assert MARK not in disk, "clear bytes on the disk"
        with sealed.reader() as f:
            assert f.read() == data
            f.seek(CHUNK - 10)
            assert f.read(20) == data[CHUNK - 10 : CHUNK + 10]
            assert f.tell() == CHUNK + 10
        with sealed.reader() as f:  # another reader starts at the start
            assert f.read(len(MARK)) == data[: len(MARK)]
    finally:
        sealed.close()
    assert _on_disk(tmp_path) == [], "closed, yet still open"


@pytest.mark.parametrize("damage", ["altered", "cut"])
def test_a_sealed_file_altered_or_cut_is_refused(tmp_path: Path, damage: str) -> None:
    sealed = SealedFile(tmp_path)
    try:
        sealed.append(_data(2 * CHUNK))
        sealed.flush()
        [path] = _open_in(tmp_path)
        with path.open("r+b") as disk:
            if damage == "altered":
                disk.seek(CHUNK + 16 + 5)
                disk.write(bytes([disk.read(1)[0] ^ 1]))
            else:
                disk.truncate(CHUNK + 16 + 100)
        with sealed.reader() as f:
            assert len(f.read(CHUNK)) == CHUNK, "the first chunk is intact"
            with pytest.raises(SpoolIntegrityError, match="integrity check") as raised:
                f.read(10)
        assert MARK not in str(raised.value).encode()
    finally:
        sealed.close()


def test_the_spool_keeps_nothing_past_the_cap_and_says_so(tmp_path: Path) -> None:
    spool = BoundedSpool(tmp_path, 100_000)
    try:
        assert spool.write(_data(60_000)) == 60_000
        spool.file.flush()
        assert not spool.oversized
        for _ in range(5):  # each write is accepted (read off the wire) and dropped
            assert spool.write(_data(60_000)) == 60_000
        assert spool.oversized
        assert spool.size == 0
        assert _on_disk(tmp_path) == [b""], "the spool kept bytes past the cap"
        assert received(spool.name) is spool
    finally:
        spool.close()


def test_a_spool_under_the_cap_keeps_everything_and_is_found_by_its_path(
    tmp_path: Path,
) -> None:
    data = _data(100_000)
    spool = BoundedSpool(tmp_path, 100_000)
    try:
        spool.write(data[:99_000])
        spool.write(data[99_000:])
        assert not spool.oversized
        found = received(Path(spool.name))  # as pynetdicom's event.dataset_path
        with found.reader() as f:
            assert f.read() == data
        assert all(MARK not in disk for disk in _on_disk(tmp_path))
    finally:
        spool.close()
    with pytest.raises(SpoolError):
        received(spool.name)
    with pytest.raises(SpoolError):
        spool.reader()
    assert _on_disk(tmp_path) == []


def test_the_c_store_handler_reads_the_patient_back_through_the_spool(tmp_path: Path) -> None:
    """pydicom takes an ``io.BufferedReader`` for a file it may reopen by name (to read a
    deferred value): the spool's reader is none, and has no name to reopen."""
    data = content.dicom("SYN-0417", "urn:oid:2.999.1", pixels=os.urandom(200_000))
    spool = BoundedSpool(tmp_path, 1 << 20)
    try:
        for at in range(0, len(data), 16_384):  # as pynetdicom writes fragments
            spool.write(data[at : at + 16_384])
        with spool.reader() as f:
            patient, _ = instance_patient(f)
        assert patient == PatientRef("SYN-0417", "urn:oid:2.999.1")
    finally:
        spool.close()


def test_release_closes_the_unread_spools_of_an_ended_association(tmp_path: Path) -> None:
    class Association:
        """Stands for a pynetdicom association (the spool only keeps a weak reference)."""

    ended, other = Association(), Association()
    unread = BoundedSpool(tmp_path, 1000, ended)
    being_read = BoundedSpool(tmp_path, 1000, ended)
    elsewhere = BoundedSpool(tmp_path, 1000, other)
    try:
        for spool in (unread, being_read, elsewhere):
            spool.write(b"x" * 100)
        reader = being_read.reader()
        assert release(ended) == 1
        with pytest.raises(SpoolError):
            received(unread.name)
        assert reader.read() == b"x" * 100, "a spool a handler reads was closed under it"
        assert received(elsewhere.name) is elsewhere
        assert len(_on_disk(tmp_path)) == 2
    finally:
        for spool in (unread, being_read, elsewhere):
            spool.close()


def test_a_spool_dropped_unclosed_gives_its_file_back(tmp_path: Path) -> None:
    spool = BoundedSpool(tmp_path, 1000)
    spool.write(b"x" * 100)
    assert len(_on_disk(tmp_path)) == 1
    del spool
    gc.collect()
    assert _on_disk(tmp_path) == []


def test_the_spool_folder_is_created_private_and_emptied_of_leftovers(tmp_path: Path) -> None:
    folder = tmp_path / "state" / "dicom-spool"
    assert prepare(folder) == 0
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    folder.chmod(0o755)
    for name in ("0" * 32, "ab" * 16):  # what a process killed before its unlink leaves
        (folder / f"{name}.spool").write_bytes(b"")
    assert prepare(folder) == 2
    assert list(folder.iterdir()) == []
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_spool_folder_holding_other_files_is_refused_not_emptied(tmp_path: Path) -> None:
    """Emptied at every start: pointed at the state folder itself, it would delete the
    audit witness or the SQLite database."""
    (tmp_path / "audit-witness.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"spool_directory .* 1 entries that are not spool"):
        prepare(tmp_path)
    assert (tmp_path / "audit-witness.jsonl").exists()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="must be a folder"):
        prepare(tmp_path / "link")


def test_a_spool_folder_refused_at_start_keeps_its_mode(tmp_path: Path) -> None:
    """``spool_directory`` pointed by mistake at a shared folder (``/tmp``, a service
    runs as root in a container): refused, yet its mode was put to 0700 first, taking it
    from every other user."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / "someone-elses.txt").write_text("x")
    with pytest.raises(ConfigError, match="not spool files"):
        prepare(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777, "a refused folder's mode changed"
    assert (shared / "someone-elses.txt").exists()


def test_an_association_sending_without_waiting_gets_no_third_spool_file(
    tmp_path: Path,
) -> None:
    class Association:
        """Stands for a pynetdicom association."""

    peer, other = Association(), Association()
    spools = [BoundedSpool(tmp_path, 1000, peer) for _ in range(4)]
    elsewhere = BoundedSpool(tmp_path, 1000, other)
    try:
        for spool in (*spools, elsewhere):
            spool.write(b"x" * 100)
        assert len(_open_in(tmp_path)) == 3, "one file per spool, however many pending"
        assert [s.busy for s in spools] == [False, False, True, True]
        assert not elsewhere.busy
        with pytest.raises(SpoolError):
            spools[2].reader()
        spools[0].close()  # answered: the next one has a file again
        assert not BoundedSpool(tmp_path, 1000, peer).busy
    finally:
        for spool in (*spools, elsewhere):
            spool.close()


def test_a_spool_the_disk_refuses_is_failed_and_logged_naming_its_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No space (here a file size limit, EFBIG): the rest is dropped, the spool says it
    failed, and the log names the folder (the setting) and the reason, not the data."""
    spool = BoundedSpool(tmp_path, 1 << 20)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 * CHUNK, hard))
    try:
        spool.write(_data(4 * CHUNK))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    try:
        assert spool.failed
        assert _on_disk(tmp_path) == [b""], "the part kept is given back"
        [record] = [r for r in caplog.records if r.name == "service.dicom.spool"]
        assert getattr(record, "spool_directory", None) == str(tmp_path)
        assert MARK.decode() not in caplog.text
    finally:
        spool.close()
    missing = BoundedSpool(tmp_path / "gone", 1000)  # the folder removed at run time
    assert missing.failed
    with pytest.raises(SpoolError):
        missing.reader()
    missing.close()


def test_a_close_from_another_thread_waits_for_a_read_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``release`` may close a spool (on the connection's thread) as its handler starts
    reading it: the close waits for the read, so no read or write reaches the descriptor
    number after it is closed (and possibly reused by another file of the process)."""
    sealed = SealedFile(tmp_path)
    sealed.append(b"x" * (CHUNK + 10))
    reader = sealed.reader()
    in_read, go_on = threading.Event(), threading.Event()
    real_pread = os.pread

    def slow_pread(fd: int, length: int, offset: int) -> bytes:
        in_read.set()
        assert go_on.wait(10)
        return real_pread(fd, length, offset)

    monkeypatch.setattr("service.dicom.sealed_file.os.pread", slow_pread)
    got: list[bytes] = []
    reading = threading.Thread(target=lambda: got.append(reader.read(5)))
    reading.start()
    assert in_read.wait(10)
    closing = threading.Thread(target=sealed.close)
    closing.start()
    closing.join(0.3)
    assert closing.is_alive(), "the descriptor was closed under a read in progress"
    go_on.set()
    reading.join(10)
    closing.join(10)
    assert got == [b"xxxxx"]
    assert sealed.closed
    with pytest.raises(ValueError, match="closed"):
        sealed.read_chunk(1)
