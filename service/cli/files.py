"""Files the CLI writes that hold patient data or signatures: private to their owner."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

PRIVATE_MODE = 0o600


def create_private(path: Path, *, exclusive: bool = False) -> BinaryIO:
    """Open ``path`` for writing, readable and writable by its owner only.

    A new file is created with mode 0600 (the umask can only narrow it). An existing
    regular file is truncated and narrowed to 0600 before anything is written, unless
    ``exclusive``: then the file must not exist (for a scratch ``.partial`` name, so a
    planted file or symlink has no say over where the data goes or its mode).
    """
    flags = os.O_CREAT | os.O_WRONLY | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, PRIVATE_MODE)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, PRIVATE_MODE)
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise
