"""``service.allocator.tune``: freed large blocks stay in the main heap for reuse.

Each case runs in a fresh interpreter: mallopt settings are process-wide, and the
untuned control needs glibc's defaults.
"""

from __future__ import annotations

import subprocess
import sys

from service import allocator

_PROBE = """
import ctypes, sys
from service import allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
tuned = allocator.tune() if sys.argv[1] == "tune" else None
block = libc.malloc(3 << 20)  # a few 1 MiB messages' worth, below MMAP_THRESHOLD
mapped = libc.mallinfo2().hblks
libc.free(block)
print(tuned, mapped, libc.mallinfo2().keepcost)
"""


def _probe(mode: str) -> tuple[str, int, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1]), int(out[2])


def test_tuned_heap_keeps_a_freed_block_for_the_next_message() -> None:
    tuned, _, keep = _probe("tune")
    assert tuned == "True"
    # The freed 3 MiB stays at the top of the main heap: the next message reuses it
    # without the kernel zeroing and faulting in fresh pages.
    assert keep >= 3 << 20


def test_untuned_heap_maps_and_returns_the_block() -> None:
    """The control: glibc's defaults map such a block and unmap it when freed."""
    _, mapped_default, keep_default = _probe("default")
    _, mapped_tuned, _ = _probe("tune")
    assert mapped_default == mapped_tuned + 1
    assert keep_default < 1 << 20


def test_thresholds_bound_what_is_kept() -> None:
    # What each heap keeps free is bounded well under the 100 MiB memory budget, and a
    # 1 MiB chunk (the largest message) is never mapped.
    assert allocator.TRIM_THRESHOLD <= 32 << 20
    assert allocator.MMAP_THRESHOLD >= 8 << 20
