"""Where a C-STORE's data set goes while it arrives: a sealed, nameless file of bounded size.

pynetdicom (with ``STORE_RECV_CHUNKED_DATASET``) writes each received data set to a
``NamedTemporaryFile`` of the system's temporary folder as its fragments arrive, in
clear, and deletes it only after the C-STORE handler ran: a process killed meanwhile, or
an association aborted mid-transfer, left the patient's data there for good.

``install(cap, folder)`` replaces that file with a ``BoundedSpool``: a
``service.dicom.sealed_file.SealedFile`` in the service's spool folder (nameless, sealed
under a key held only in memory, so nothing of the data set is ever on the disk in clear
and nothing outlives the process). It stops writing after ``cap`` bytes and remembers
that it did: the rest of an oversized data set is read off the network and dropped, and
the C-STORE handler refuses the instance (``oversized``) without storing anything.

pynetdicom uses the object it gets as follows (pynetdicom 3.0, ``dimse_messages`` and
``service_class``), and nothing else: ``name`` (which becomes ``event.dataset_path``),
``write`` (the preamble, the file meta, then each fragment), ``file.flush()`` after each
fragment, and after the handler ``close()`` then ``os.unlink(name)`` (which finds no file
and is ignored). The handler finds the spool by ``event.dataset_path`` (``received``) and
reads it back through ``BoundedSpool.reader``; ``event.dataset``, which would reopen the
path, is not used (it finds no file). A spool whose association ends before its
handler ran is closed by ``release`` (the listener calls it when a connection closes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import threading
import weakref
from pathlib import Path
from secrets import token_hex
from typing import Any, BinaryIO

import pynetdicom.dimse_messages

from service.config import ConfigError
from service.dicom.sealed_file import SUFFIX, SealedFile
from service.errors import ServiceError

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_LIVE: weakref.WeakValueDictionary[str, BoundedSpool] = weakref.WeakValueDictionary()
_NAME = re.compile(r"[0-9a-f]{32}" + re.escape(SUFFIX))
# A peer waits for each C-STORE's answer (no asynchronous operations are negotiated), and
# pynetdicom closes a spool before it answers: an association holds one spool file. One
# that sends on regardless had pynetdicom queue a spool per data set (a descriptor, up to
# the cap of disk, a chunk of memory); past this many its data sets get no file (busy).
PER_ASSOCIATION = 2


class SpoolError(ServiceError):
    """A received data set cannot be read back from its spool (no spool, or closed)."""


class BoundedSpool:
    """What pynetdicom takes for its temporary file: keeps the first ``cap`` bytes, sealed."""

    def __init__(self, folder: Path, cap: int, owner: object = None) -> None:
        self._folder = folder
        self._cap = cap
        self._owner = weakref.ref(owner) if owner is not None else None
        self.oversized = False  # more than ``cap`` bytes came: the rest was dropped
        self.failed = False  # the disk refused the file or a write: the rest was dropped
        self.reading = False  # a handler reads it (``release`` leaves it to pynetdicom)
        self._file: SealedFile | None = None
        with _LOCK:
            # Only the association's own reading thread creates its spools: no race.
            self.busy = owner is not None and _files_of(owner) >= PER_ASSOCIATION
        if not self.busy:
            try:
                self._file = SealedFile(folder)
            except OSError as e:  # the folder gone, no descriptor or inode left
                self._failed("dicom spool file cannot be created", e)
        # pynetdicom unlinks this name after the handler: none has a file by that name.
        self.name: str = self._file.name if self._file else str(folder / token_hex(16))
        with _LOCK:
            _LIVE[self.name] = self

    def _failed(self, message: str, error: OSError) -> None:
        self.failed = True
        log.warning(message, extra={"spool_directory": str(self._folder),
                                    "error": error.strerror})  # fmt: skip

    @property
    def file(self) -> BoundedSpool:
        """pynetdicom flushes ``file`` after each fragment."""
        return self

    @property
    def size(self) -> int:
        """Bytes kept (the file meta and the data set, unless dropped)."""
        return self._file.size if self._file else 0

    @property
    def holds_file(self) -> bool:
        """True while its file is open (what counts against ``PER_ASSOCIATION``)."""
        return self._file is not None and not self._file.closed

    def owned_by(self, association: object) -> bool:
        """True if ``association`` received this data set."""
        return self._owner is not None and self._owner() is association

    def write(self, data: bytes) -> int:
        """Keep ``data`` while under the cap; afterwards drop it (and note the overflow)."""
        if self._file is None or self.oversized or self.failed or self._file.closed:
            return len(data)
        if self._file.size + len(data) > self._cap:
            self.oversized = True
            self._drop()  # the part kept is useless: give the disk back now
            return len(data)
        try:
            self._file.append(data)
        except OSError as e:
            self._failed("dicom spool write failed", e)
            self._drop()
        return len(data)

    def flush(self) -> None:
        """Nothing to do: a full chunk is sealed and written as it fills."""

    def _drop(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):  # the descriptor's close frees it anyway
                self._file.discard()

    def reader(self) -> BinaryIO:
        """A reader of the data set kept (Part 10: preamble, file meta, data set)."""
        if self.busy or self.failed:
            raise SpoolError("the received data set could not be spooled")
        if self._file is None or self._file.closed:
            raise SpoolError("the received data set's spool is closed")
        self.reading = True
        return self._file.reader()

    def close(self) -> None:
        """Close the file: the kernel frees it, and the key is dropped."""
        if self._file is not None:
            self._file.close()
        with _LOCK:
            if _LIVE.get(self.name) is self:
                del _LIVE[self.name]


def _files_of(association: object) -> int:
    """How many spool files ``association`` holds open (call under ``_LOCK``)."""
    return sum(1 for s in _LIVE.values() if s.owned_by(association) and s.holds_file)


def received(path: str | os.PathLike[str]) -> BoundedSpool:
    """The spool of the data set at ``event.dataset_path``; ``SpoolError`` if none."""
    with _LOCK:
        found = _LIVE.get(os.fspath(path))
    if found is None:
        raise SpoolError("the received data set has no spool")
    return found


def release(association: object) -> int:
    """Close the spools of ``association`` that no handler reads; how many were closed.

    A data set whose association ends (aborted, closed) before its handler ran would
    otherwise hold its file, up to the cap, until the garbage collector found it.
    """
    with _LOCK:
        mine = [s for s in _LIVE.values() if s.owned_by(association) and not s.reading]
    for spool in mine:
        spool.close()
    return len(mine)


def prepare(folder: Path) -> int:
    """Create the spool folder (mode 0700) and empty it; the number of leftovers removed.

    A leftover can only be an empty file (a process killed between creating a spool file
    and unlinking it). The folder must hold nothing else: it is emptied at every start,
    so a folder shared with other files is refused rather than emptied, and its mode is
    set only then (a shared ``/tmp`` kept its mode).
    """
    where = f"[dicom] spool_directory {folder}"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not stat.S_ISDIR(folder.lstat().st_mode):
            raise ConfigError(f"{where} must be a folder (not a link or a file)")
        entries = list(os.scandir(folder))
        foreign = [e for e in entries if not (_NAME.fullmatch(e.name) and e.is_file(
            follow_symlinks=False))]  # fmt: skip
        if foreign:
            raise ConfigError(f"{where} holds {len(foreign)} entries that are not spool "
                              "files: give the spool a folder of its own (it is emptied "
                              "at every start)")  # fmt: skip
        folder.chmod(0o700)  # only once it is known to be the spool's own
        for entry in entries:
            Path(entry.path).unlink(missing_ok=True)
    except OSError as e:
        raise ConfigError(f"{where} cannot be created or emptied: {e.strerror}") from e
    return len(entries)


def install(cap: int, folder: Path) -> None:
    """Make pynetdicom spool received data sets into ``BoundedSpool`` files of ``cap``."""

    def spool(**_: Any) -> BoundedSpool:
        # pynetdicom creates the file in the thread that decodes the association's PDUs
        # (its DUL provider), which knows its association.
        return BoundedSpool(folder, cap, getattr(threading.current_thread(), "assoc", None))

    pynetdicom.dimse_messages.NamedTemporaryFile = spool  # type: ignore[attr-defined,assignment]
