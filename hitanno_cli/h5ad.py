"""Streaming access to ``.h5ad`` files: metadata whole, the count matrix in row chunks.

The count matrix of an atlas does not fit in memory, so nothing here loads it whole:
:meth:`H5ad.iter_chunks` reads a CSR (or dense) matrix a block of rows at a time
straight from HDF5. ``obs`` and ``var`` are small and are read whole.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem

from hitanno_cli.errors import UserError
from hitanno_cli.host import usable_cores

try:  # Intel ISA-L inflates the same deflate streams faster than zlib
    from isal.isal_zlib import decompress as inflate
except ImportError:  # a platform without an isal wheel: the standard library's zlib
    from zlib import decompress as inflate

#: Rows per chunk are chosen so a chunk holds about this many stored entries.
TARGET_CHUNK_NNZ = 8_000_000


class H5ad:
    """An open ``.h5ad`` file (use as a context manager)."""

    def __init__(self, path: str | Path, layer: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"input {self.path} does not exist", "check the path")
        if not h5py.is_hdf5(self.path):
            raise UserError(
                f"input {self.path} is not an .h5ad file (not HDF5)",
                "pass an AnnData file written by anndata.write_h5ad",
            )
        self._file = h5py.File(self.path, "r")
        missing = [key for key in ("obs", "var") if key not in self._file]
        matrix_key = f"layers/{layer}" if layer else "X"
        if missing or matrix_key not in self._file:
            self.close()
            what = ", ".join(missing + ([matrix_key] if matrix_key not in self._file else []))
            raise UserError(
                f"input {self.path} is not an AnnData .h5ad file (no {what})",
                "pass an AnnData file written by anndata.write_h5ad" + (" or a --layer that exists" if layer else ""),
            )
        self._matrix = self._file[matrix_key]
        self._matrix_name = matrix_key
        self._layout = self._matrix_layout()
        self._obs: pd.DataFrame | None = None
        self._var: pd.DataFrame | None = None
        self._labels: dict[str, np.ndarray] = {}
        self._parts: dict[str, h5py.Dataset] | None = None

    def __enter__(self) -> H5ad:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying HDF5 file."""
        self._file.close()

    # -- shape and metadata ------------------------------------------------------------
    def _matrix_layout(self) -> str:
        node = self._matrix
        if isinstance(node, h5py.Dataset):
            return "dense"
        encoding = node.attrs.get("encoding-type", "")
        if isinstance(encoding, bytes):
            encoding = encoding.decode()
        if encoding == "csr_matrix":
            return "csr"
        if encoding == "csc_matrix":
            raise UserError(
                f"{self.path}: {self._matrix_name} is stored column-major (CSC), which cannot be streamed by cells",
                "rewrite it row-major: adata.X = adata.X.tocsr(); adata.write_h5ad(...)",
            )
        raise UserError(
            f"{self.path}: {self._matrix_name} has an unsupported encoding '{encoding}'",
            "store counts as a CSR sparse or dense matrix",
        )

    @property
    def shape(self) -> tuple[int, int]:
        """(cells, features) of the count matrix."""
        if self._layout == "dense":
            return tuple(int(n) for n in self._matrix.shape)  # type: ignore[return-value]
        return tuple(int(n) for n in self._matrix.attrs["shape"])  # type: ignore[return-value]

    @property
    def n_obs(self) -> int:
        return self.shape[0]

    @property
    def n_vars(self) -> int:
        return self.shape[1]

    @property
    def obs(self) -> pd.DataFrame:
        """The cell annotations (read once, whole: they are small)."""
        if self._obs is None:
            self._obs = read_elem(self._file["obs"])
        return self._obs

    @property
    def var(self) -> pd.DataFrame:
        """The feature annotations (read once, whole)."""
        if self._var is None:
            self._var = read_elem(self._file["var"])
        return self._var

    def _columnwise(self, frame: str) -> bool:
        """Whether obs/var is a column-per-dataset group (anndata ≥ 0.7), readable one column at a time."""
        node = self._file[frame]
        return isinstance(node, h5py.Group) and "_index" in node.attrs and "column-order" in node.attrs

    def obs_columns(self) -> list[str]:
        """Names of the obs columns (without reading them)."""
        if self._obs is None and self._columnwise("obs"):
            order = self._file["obs"].attrs["column-order"]
            return [c.decode() if isinstance(c, bytes) else str(c) for c in np.atleast_1d(order)]
        return [str(c) for c in self.obs.columns]

    def _index(self, frame: str) -> pd.Index:
        """The obs or var index, read alone when the layout allows."""
        loaded = self._obs if frame == "obs" else self._var
        if loaded is None and self._columnwise(frame):
            node = self._file[frame]
            return pd.Index(read_elem(node[node.attrs["_index"]]))
        return (self.obs if frame == "obs" else self.var).index

    def _obs_column(self, key: str) -> pd.Series:
        """One obs column, read alone when the layout allows."""
        if self._obs is None and self._columnwise("obs"):
            return pd.Series(read_elem(self._file["obs"][key]))
        return self.obs[key]

    def obs_names(self) -> np.ndarray:
        """Cell ids as an array of str."""
        return np.asarray(self._index("obs").astype(str))

    def var_names(self) -> np.ndarray:
        """Feature names as an array of str."""
        return np.asarray(self._index("var").astype(str))

    def unique_var_names(self) -> np.ndarray:
        """Feature names, refusing duplicates (a peak must be identifiable by its name)."""
        names = self.var_names()
        if len(set(names)) != len(names):
            dup = next(name for name, count in Counter(names.tolist()).items() if count > 1)
            raise UserError(
                f"{self.path} has duplicate peak names (e.g. '{dup}')",
                "make var_names unique (adata.var_names_make_unique()) and save the file again",
            )
        return names

    def labels(self, key: str) -> np.ndarray:
        """The ``obs[key]`` column as an object array of str, ``None`` where missing."""
        if key not in self.obs_columns():
            columns = ", ".join(self.obs_columns()[:20]) or "none"
            raise UserError(
                f"label key '{key}' is not a column of obs in {self.path}",
                f"pass --label-key with one of: {columns}",
            )
        if key not in self._labels:
            column = self._obs_column(key)
            values = column.astype(object).to_numpy()
            missing = pd.isna(column).to_numpy()
            self._labels[key] = np.array([None if m else str(v) for v, m in zip(values, missing)], dtype=object)
        return self._labels[key]

    # -- the matrix, streamed -------------------------------------------------------------
    def default_chunk_rows(self) -> int:
        """Rows per chunk that keep one chunk near :data:`TARGET_CHUNK_NNZ` entries."""
        n_obs, n_vars = self.shape
        if self._layout == "dense":
            per_row = max(n_vars, 1)
        else:
            per_row = max(int(self._matrix["indptr"][-1]) / max(n_obs, 1), 1.0)
        return int(min(max(TARGET_CHUNK_NNZ // per_row, 256), 200_000))

    def iter_chunks(
        self, start: int = 0, stop: int | None = None, chunk_rows: int | None = None
    ) -> Iterator[tuple[int, sp.csr_matrix]]:
        """Yield ``(first_row, csr_chunk)`` over rows ``[start, stop)`` in row blocks."""
        stop = self.n_obs if stop is None else stop
        chunk_rows = chunk_rows or self.default_chunk_rows()
        for lo in range(start, stop, chunk_rows):
            hi = min(lo + chunk_rows, stop)
            yield lo, self.read_rows(lo, hi)

    def _csr_parts(self) -> dict[str, h5py.Dataset]:
        """The CSR datasets, looked up once (h5py's lookup by name costs ~0.5 ms a call)."""
        if self._parts is None:
            self._parts = {name: self._matrix[name] for name in ("data", "indices", "indptr")}
        return self._parts

    def read_rows(self, lo: int, hi: int) -> sp.csr_matrix:
        """Rows ``[lo, hi)`` as a CSR matrix."""
        if self._layout == "dense":
            return sp.csr_matrix(self._matrix[lo:hi])
        parts = self._csr_parts()
        indptr = parts["indptr"][lo : hi + 1].astype(np.int64)
        a, b = int(indptr[0]), int(indptr[-1])
        data, indices = read_ranges([parts["data"], parts["indices"]], a, b)
        return sp.csr_matrix((data, indices, indptr - a), shape=(hi - lo, self.n_vars))


# -- reading compressed datasets on two cores ---------------------------------------------
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
    """``[d[a:b] for d in datasets]``, inflating gzip chunks on two cores where that pays.

    h5py decompresses under one lock; reading the raw chunks and inflating them with
    ISA-L (or zlib) in two threads, both of which release the GIL, uses the second core.
    Anything but plain deflate-compressed 1-D chunks is read by h5py as usual.
    """
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


def check_counts(data: np.ndarray, source: str | Path, first_row: int) -> None:
    """Refuse negative, NaN/inf or non-integer values where raw counts are expected."""
    if data.dtype.kind in "iub":
        if data.dtype.kind == "i" and data.size and data.min() < 0:
            raise UserError(
                f"{source} has negative counts (rows from {first_row})",
                "pass raw counts (non-negative integers), e.g. from adata.raw or a counts layer",
            )
        return
    if not np.all(np.isfinite(data)):
        raise UserError(
            f"{source} has NaN or infinite values (rows from {first_row})",
            "pass raw counts without missing values",
        )
    if data.size and data.min() < 0:
        raise UserError(
            f"{source} has negative counts (rows from {first_row})",
            "pass raw counts (non-negative integers), e.g. from adata.raw or a counts layer",
        )
    fractional = data != np.floor(data)
    if fractional.any():
        example = float(data[np.argmax(fractional)])
        raise UserError(
            f"{source} has non-integer values such as {example:g} where counts are expected",
            "pass raw counts, not normalised data (use --layer if counts are in a layer)",
        )
