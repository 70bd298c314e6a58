"""Reading gzip-compressed HDF5 datasets on two cores.

h5py decompresses under one lock. Reading a range's raw chunks and inflating them in two
threads, with ISA-L (or zlib), both of which release the GIL, uses the second core; on
one core, or for anything but plain deflate-compressed 1-D chunks, h5py reads as usual.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import cache

import h5py
import numpy as np

from hitanno_cli.host import usable_cores

try:  # Intel ISA-L inflates the same deflate streams faster than zlib
    from isal.isal_zlib import decompress as inflate
    from isal.isal_zlib import error as InflateError
except ImportError:  # a platform without an isal wheel: the standard library's zlib
    from zlib import decompress as inflate
    from zlib import error as InflateError

__all__ = ["InflateError", "read_ranges"]

#: Below this many entries a range is read by h5py directly (threads would not pay).
PARALLEL_MIN_ENTRIES = 1 << 18


def _deflate_only(dataset: h5py.Dataset) -> bool:
    """Whether ``dataset`` is a chunked 1-D array whose only filter is deflate (gzip)."""
    if dataset.ndim != 1 or dataset.chunks is None:
        return False
    plist = dataset.id.get_create_plist()
    return plist.get_nfilters() == 1 and plist.get_filter(0)[0] == h5py.h5z.FILTER_DEFLATE


@cache
def _inflate_pool() -> ThreadPoolExecutor | None:
    """Two threads for decompression, or None on a single core (ISA-L and zlib release the GIL)."""
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="hitanno-inflate") if usable_cores() > 1 else None


def read_ranges(datasets: list[h5py.Dataset], a: int, b: int) -> list[np.ndarray]:
    """``[d[a:b] for d in datasets]``, inflating gzip chunks on two cores where that pays."""
    pool = _inflate_pool()
    if pool is None or b - a < PARALLEL_MIN_ENTRIES or not all(map(_deflate_only, datasets)):
        return [d[a:b] for d in datasets]
    outs, jobs = [], []
    for d in datasets:
        out = np.empty(b - a, dtype=d.dtype)
        step = d.chunks[0]
        for lo in range(a - a % step, b, step):
            try:
                skipped_filters, raw = d.id.read_direct_chunk((lo,))
            except (OSError, RuntimeError, KeyError, ValueError):  # e.g. a chunk never written (fill value)
                skipped_filters = 1
            if skipped_filters:  # an odd chunk: let h5py read the whole range
                return [d[a:b] for d in datasets]
            jobs.append((raw, out, lo, step))
        outs.append(out)
    sizes = np.cumsum([len(job[0]) for job in jobs])
    cut = int(np.searchsorted(sizes, sizes[-1] / 2))  # two halves of about equal compressed size
    for future in [pool.submit(_inflate, jobs[:cut], a, b), pool.submit(_inflate, jobs[cut:], a, b)]:
        future.result()
    return outs


def _inflate(jobs: list[tuple[bytes, np.ndarray, int, int]], a: int, b: int) -> None:
    """Inflate each raw chunk (first entry ``lo``) into the part of ``out`` it covers."""
    for raw, out, lo, step in jobs:
        chunk = np.frombuffer(inflate(raw), dtype=out.dtype)
        first, last = max(lo, a), min(lo + step, b)
        out[first - a : last - a] = chunk[first - lo : last - lo]
