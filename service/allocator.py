"""Keep glibc from handing the main heap back to the kernel after every large message.

The gRPC event loop runs on the main thread, so the buffers of every message it
(de)serialises come from glibc's main arena. By default glibc trims that heap whenever
more than 128 KiB at its top is free (the threshold grows only when an ``mmap``-sized
block is freed, which these are not), so each 512 KiB or 1 MiB message was allocated in
pages the kernel had just taken back and had to zero and fault in again: building and
serialising one 512 KiB ``GetRecordResponse`` cost ~0.8 ms on the main thread against
~0.05 ms in a worker thread (whose arena is not trimmed that way).

``tune()`` fixes both thresholds (which also turns off glibc's dynamic adjustment) at
what that adjustment reaches after the first 8 MiB S3 part buffer of a large put is
freed: blocks up to ``MMAP_THRESHOLD`` come from the heap (an ``mmap`` per part costs
fresh pages each time), and up to ``TRIM_THRESHOLD`` of free memory stays at the top of
each heap for the next message. A process that only ever sees small and medium records
now gets that state from the start. What is kept stays within the service's memory
budget (``test_200_mib_record_in_bounded_server_memory``; docs/performance.md). It holds
no data: freed memory is only reused by the process.
"""

from __future__ import annotations

import ctypes
import functools
import logging

logger = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest; S3 part buffers (8 MiB) stay in the heap
TRIM_THRESHOLD = 16 << 20


@functools.cache
def tune() -> bool:
    """Set glibc's trim and mmap thresholds; False (and nothing changed) off glibc.

    Once per process: the settings are process-wide, and a CLI command may open several
    channels.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.debug("not glibc: allocator thresholds left as they are")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
