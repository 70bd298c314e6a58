"""The machine this process runs on: the cores it may use, and glibc's allocator.

Nothing here imports torch, so the stages that only read and write data (select-peaks,
encode) stay quick to start.
"""

from __future__ import annotations

import ctypes
import os
import sys


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a SLURM allocation)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


#: mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_kept_freed_memory = False


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed memory instead of returning it; True if it took effect.

    A training step, or a chunk of select-peaks and encode, allocates and frees large
    temporaries. By default glibc returns large freed blocks to the system and maps
    fresh pages on the next step, and on virtual machines every first touch of a fresh
    page is costly. Keeping freed memory in the process (what a jemalloc or tcmalloc
    preload achieves) avoids that; the peak resident memory stays the high-water mark of
    live data. Idempotent; a no-op (False) off Linux/glibc or when
    ``HITANNO_KEEP_FREED_MEMORY=0``.
    """
    global _kept_freed_memory
    if _kept_freed_memory:
        return True
    if os.environ.get("HITANNO_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = (
        (_M_MMAP_THRESHOLD, 1 << 30),  # blocks under 1 GiB come from the heap, reused when freed
        (_M_TRIM_THRESHOLD, 2**31 - 1),  # never shrink the heap's top
        (_M_TOP_PAD, 64 << 20),  # grow it in 64 MiB steps
    )
    _kept_freed_memory = all(mallopt(param, value) == 1 for param, value in settings)
    return _kept_freed_memory
