"""glibc malloc settings for the server process, so that memory freed after a burst of large requests goes back
to the system instead of staying in the process.

glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MB on 64-bit), so after the
first 20 MB request body is freed, later bodies, parsed messages and batch tensors come from the heap and
per-thread arenas, which keep what is freed. A fixed threshold (which also turns the raising off) and few
arenas keep blocks of a MB or more in mmap, returned on free (measured with benchmarks/hostile_load.py:
docs/admission.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("embedforge.server.memory")

M_ARENA_MAX = -8  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
ARENA_MAX = 2


def bound_malloc() -> bool:
    """Set glibc's mmap threshold (1 MB) and arena count (2); call before threads start. False (and nothing
    changed) where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_ARENA_MAX, ARENA_MAX) == 1
    if not ok:
        log.warning("event=mallopt_failed detail=\"memory freed after large requests may stay in the process\"")
    return ok
