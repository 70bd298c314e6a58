"""Process-wide tuning of glibc's malloc for torch work on the CPU.

A training step allocates and frees hundreds of megabytes of temporaries. By default
glibc hands large freed blocks back to the operating system and maps fresh pages on
the next step, and on virtual machines every first touch of a fresh page is costly:
zero-filling gradients ran at ~0.5 GB/s. Keeping freed memory inside the process
(what jemalloc or tcmalloc preloads achieve, and what PyTorch's CPU tuning guides
advise) made CPU training about 30 % faster here (``bench/throughput.py``), and
select-peaks + encode of Granja ~10 % faster (their row chunks' temporaries). The peak
resident memory stays the high-water mark of live tensors; memory freed after the
peak is not returned to the system until the process exits.

Set ``HITANNO_KEEP_FREED_MEMORY=0`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3

_applied = False


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed memory instead of returning it; True if it took effect.

    Idempotent; a no-op (False) off Linux/glibc or when ``HITANNO_KEEP_FREED_MEMORY=0``.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("HITANNO_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, 1 << 30),  # blocks under 1 GiB come from the heap, reused when freed
        (_M_TRIM_THRESHOLD, 2**31 - 1),  # never shrink the heap's top
        (_M_TOP_PAD, 64 << 20),  # grow it in 64 MiB steps
    ))
    _applied = ok
    return ok
