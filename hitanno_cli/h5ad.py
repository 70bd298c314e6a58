"""Streaming access to ``.h5ad`` files: metadata whole, the count matrix in row chunks.

The count matrix of an atlas does not fit in memory, so nothing here loads it whole:
:meth:`H5ad.iter_chunks` reads a CSR (or dense) matrix a block of rows at a time
straight from HDF5. ``obs`` and ``var`` are small and are read whole.
"""

from __future__ import annotations

import os
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata._io.specs.registry import IORegistryError
from anndata.io import read_elem

from hitanno_cli.errors import UserError
from hitanno_cli.hdf5_chunks import InflateError, read_ranges

#: What h5py, anndata and the inflaters raise on a truncated or damaged file.
READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    KeyError,
    ValueError,
    RuntimeError,
    IndexError,
    IORegistryError,
    zlib.error,
    InflateError,
)

#: Usual names of the cell-type column, compared without case, spaces, ``_``, ``-`` or ``.``.
LABEL_NAMES = frozenset(
    {"celltype", "celltypes", "label", "labels", "celllabel", "celllabels", "annotation", "cellannotation"}
)


def _squash(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


#: Rows per chunk are chosen so a chunk holds about this many stored entries.
TARGET_CHUNK_NNZ = 8_000_000


def damaged(path: str | Path, err: BaseException) -> UserError:
    """The one-line error for a file that h5py or anndata could not read."""
    return UserError(f"{path} is truncated or damaged ({_short_reason(err)})", "re-create or re-download it")


def _short_reason(err: BaseException) -> str:
    """The gist of a low-level read error: h5py's parenthesised detail, else its message, shortened."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(text.split())  # one line (anndata appends notes on new lines; str() omits them)
    detail = re.search(r"\(([^()]+)\)\s*$", text)
    if detail and text.startswith(("Unable to", "Can't", "unable to")):
        text = detail.group(1)
    cut = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", text)
    if cut:
        text = f"it ends at byte {cut.group(1)} of {cut.group(2)}"
    text = text or type(err).__name__
    return text if len(text) <= 100 else text[:97] + "..."


class H5ad:
    """An open ``.h5ad`` file (use as a context manager)."""

    def __init__(self, path: str | Path, layer: str | None = None) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise UserError(f"{self.path} is a directory, not an .h5ad file", "pass the path of an .h5ad file")
        if not self.path.is_file():
            raise UserError(f"input {self.path} does not exist", "check the path")
        if not os.access(self.path, os.R_OK):
            raise UserError(f"{self.path} cannot be read (permission denied)", "check the file's permissions")
        if not h5py.is_hdf5(self.path):
            raise UserError(
                f"input {self.path} is not an .h5ad file (not HDF5)",
                "pass an AnnData file written by anndata.write_h5ad",
            )
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            if "unable to lock" in str(err).lower():  # HDF5's file locking, not damage
                raise UserError(
                    f"{self.path} is locked by another process ({_short_reason(err)})",
                    "wait for the writer to finish, or set HDF5_USE_FILE_LOCKING=FALSE",
                ) from None
            raise damaged(self.path, err) from None
        try:
            with self._reading():
                self._open_matrix(layer)
        except UserError:
            self.close()
            raise
        self._obs: pd.DataFrame | None = None
        self._var: pd.DataFrame | None = None
        self._labels: dict[str, np.ndarray] = {}
        self._parts: dict[str, h5py.Dataset] | None = None

    def _open_matrix(self, layer: str | None) -> None:
        """Find obs, var and the count matrix (X or the layer); learn its layout and shape."""
        missing = [key for key in ("obs", "var") if key not in self._file]
        if layer and not missing and f"layers/{layer}" not in self._file:
            layers = sorted(self._file["layers"].keys()) if "layers" in self._file else []
            raise UserError(
                f"{self.path} has no layer '{layer}'",
                f"pass --layer with one of: {', '.join(layers)}" if layers else "it has no layers: leave out --layer",
            )
        matrix_key = f"layers/{layer}" if layer else "X"
        if missing or matrix_key not in self._file:
            what = ", ".join(missing + ([matrix_key] if matrix_key not in self._file else []))
            raise UserError(
                f"input {self.path} is not an AnnData .h5ad file (no {what})",
                "pass an AnnData file written by anndata.write_h5ad",
            )
        self._matrix = self._file[matrix_key]
        self._matrix_name = matrix_key
        self._layout = self._matrix_layout()
        node = self._matrix
        shape = node.shape if self._layout == "dense" else node.attrs["shape"]
        self._shape = tuple(int(n) for n in shape)
        if len(self._shape) != 2 or min(self._shape) < 0:
            raise ValueError(f"{matrix_key} has shape {self._shape}")

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Turn a low-level read failure into :func:`damaged`'s one-line error."""
        try:
            yield
        except READ_ERRORS as err:
            raise damaged(self.path, err) from None

    def __enter__(self) -> H5ad:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying HDF5 file."""
        try:
            self._file.close()
        except READ_ERRORS:  # closing a damaged file can fail too; there is nothing left to read
            pass

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
        return self._shape  # type: ignore[return-value]

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
            with self._reading():
                self._obs = read_elem(self._file["obs"])
        return self._obs

    @property
    def var(self) -> pd.DataFrame:
        """The feature annotations (read once, whole)."""
        if self._var is None:
            with self._reading():
                self._var = read_elem(self._file["var"])
        return self._var

    def _columnwise(self, frame: str) -> bool:
        """Whether obs/var is a column-per-dataset group (anndata ≥ 0.7), readable one column at a time."""
        with self._reading():
            node = self._file[frame]
            return isinstance(node, h5py.Group) and "_index" in node.attrs and "column-order" in node.attrs

    def obs_columns(self) -> list[str]:
        """Names of the obs columns (without reading them)."""
        if self._obs is None and self._columnwise("obs"):
            with self._reading():
                order = self._file["obs"].attrs["column-order"]
                return [c.decode() if isinstance(c, bytes) else str(c) for c in np.atleast_1d(order)]
        return [str(c) for c in self.obs.columns]

    def _index(self, frame: str) -> pd.Index:
        """The obs or var index, read alone when the layout allows."""
        loaded = self._obs if frame == "obs" else self._var
        if loaded is None and self._columnwise(frame):
            with self._reading():
                node = self._file[frame]
                return pd.Index(read_elem(node[node.attrs["_index"]]))
        return (self.obs if frame == "obs" else self.var).index

    def _obs_column(self, key: str) -> pd.Series:
        """One obs column, read alone when the layout allows."""
        if self._obs is None and self._columnwise("obs"):
            with self._reading():
                return pd.Series(read_elem(self._file["obs"][key]))
        return self.obs[key]

    def obs_names(self) -> np.ndarray:
        """Cell ids as an array of str."""
        return np.asarray(self._index("obs").astype(str))

    def var_names(self) -> np.ndarray:
        """Feature names as an array of str."""
        return np.asarray(self._index("var").astype(str))

    def unique_obs_names(self) -> np.ndarray:
        """Cell ids, refusing duplicates (predictions are matched to cells by id)."""
        names = self.obs_names()
        if len(set(names)) != len(names):
            dup = next(name for name, count in Counter(names.tolist()).items() if count > 1)
            raise UserError(
                f"{self.path} has duplicate cell ids (e.g. '{dup}')",
                "make them unique (adata.obs_names_make_unique()) and save the file again",
            )
        return names

    def check_not_empty(self) -> None:
        """Refuse a matrix without cells or without peaks (nothing downstream can use it)."""
        if self.n_obs == 0:
            raise UserError(f"{self.path} has no cells", "pass a file with at least one cell (row)")
        if self.n_vars == 0:
            raise UserError(f"{self.path} has no peaks (0 columns)", "pass a file with peaks as columns (var)")

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

    def label_key(self, given: str | None) -> str:
        """The obs column of cell types: ``given``, or else the one column with a usual name
        (``cell_type``, ``celltype``, ``CellType``, ``label``, …, in any case and spelling)."""
        if given is not None:
            return given
        columns = self.obs_columns()
        found = [c for c in columns if _squash(c) in LABEL_NAMES]
        if len(found) == 1:
            return found[0]
        listed = ", ".join(columns[:20]) or "none"
        problem = (
            f"several obs columns of {self.path} could hold the cell type ({', '.join(found)})"
            if found
            else f"no obs column of {self.path} has a usual cell-type name"
        )
        raise UserError(problem, f"pass --label-key with one of: {listed}")

    def labels(self, key: str) -> np.ndarray:
        """The ``obs[key]`` column as an object array of str, ``None`` where missing.

        Missing means NaN or an empty (or whitespace-only) string: every stage leaves
        such cells out the same way.
        """
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
            text = [None if m else str(v) for v, m in zip(values, missing)]
            self._labels[key] = np.array([t if t is None or t.strip() else None for t in text], dtype=object)
        return self._labels[key]

    # -- the matrix, streamed -------------------------------------------------------------
    def default_chunk_rows(self) -> int:
        """Rows per chunk that keep one chunk near :data:`TARGET_CHUNK_NNZ` entries."""
        n_obs, n_vars = self.shape
        if self._layout == "dense":
            per_row = max(n_vars, 1)
        else:
            with self._reading():
                per_row = max(int(self._csr_parts()["indptr"][-1]) / max(n_obs, 1), 1.0)
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
        try:
            if self._layout == "dense":
                return sp.csr_matrix(self._matrix[lo:hi])
            parts = self._csr_parts()
            indptr = parts["indptr"][lo : hi + 1].astype(np.int64)
            a, b = int(indptr[0]), int(indptr[-1])
            data, indices = read_ranges([parts["data"], parts["indices"]], a, b)
            return sp.csr_matrix((data, indices, indptr - a), shape=(hi - lo, self.n_vars))
        except READ_ERRORS as err:
            raise damaged(self.path, err) from None


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
