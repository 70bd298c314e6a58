"""Cell sentences in memory: bit-packed states, and open positions as CSR rows.

A cell's sentence is its open/closed state at each of the panel's ``n_types · P``
positions (set ``t``, peak ``j`` at position ``t · P + j``). Packed, it is 8 states per
byte in little bit order; unpacked for the model, it is the list of its open positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from hitanno_cli.sentences.matching import PeakMatch

#: Size of the 0/1 scratch row block used while packing: small enough to stay in cache
#: and be reused (a fresh chunk-sized buffer would be page-faulted in every time).
SCRATCH_BITS = 1 << 21


@dataclass
class OpenRows:
    """Open panel positions of some cells, as CSR rows (one row per cell)."""

    indptr: np.ndarray  # int64 [n + 1]
    positions: np.ndarray  # int64 [nnz]

    @property
    def n(self) -> int:
        return len(self.indptr) - 1

    def take(self, rows: np.ndarray) -> OpenRows:
        """The CSR of ``rows`` (in that order), gathered without a Python loop."""
        starts, stops = self.indptr[rows], self.indptr[rows + 1]
        lengths = stops - starts
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        offsets = np.arange(indptr[-1], dtype=np.int64) - np.repeat(indptr[:-1], lengths)
        return OpenRows(indptr, self.positions[np.repeat(starts, lengths) + offsets])

    @classmethod
    def concat(cls, parts: list[OpenRows]) -> OpenRows:
        """Stack row blocks."""
        if not parts:
            return cls(np.zeros(1, np.int64), np.zeros(0, np.int64))
        sizes = np.cumsum([0] + [int(p.indptr[-1]) for p in parts[:-1]])
        indptr = np.concatenate([[0]] + [p.indptr[1:] + s for p, s in zip(parts, sizes, strict=True)])
        return cls(indptr.astype(np.int64), np.concatenate([p.positions for p in parts]))


def unpack_open(packed: np.ndarray, n_positions: int) -> OpenRows:
    """Bit-packed sentences ``[cells, n_bytes]`` → the open positions of each cell.

    Only the non-zero bytes are unpacked: a cell opens a few hundred of tens of thousands
    of positions, so unpacking every byte costs several times more than finding them."""
    byte_rows, byte_cols = np.nonzero(packed)  # row-major: cells ascending, bytes ascending
    bits = np.unpackbits(packed[byte_rows, byte_cols][:, None], axis=1, bitorder="little")
    which, bit = np.nonzero(bits)  # within a byte, bits ascending: positions stay sorted
    rows = byte_rows[which]
    positions = byte_cols[which].astype(np.int64) * 8 + bit
    if positions.size and int(positions.max()) >= n_positions:
        keep = positions < n_positions  # padding bits past the panel (never set by encode)
        rows, positions = rows[keep], positions[keep]
    indptr = np.zeros(packed.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=packed.shape[0]), out=indptr[1:])
    return OpenRows(indptr, positions)  # int64: byte offsets × 8 + bit


def pack_states(counts: sp.csr_matrix, match: PeakMatch, n_bytes: int) -> np.ndarray:
    """Bit-packed sentences ``[rows, n_bytes]`` of a chunk of raw counts.

    When every column lights at most one panel peak (the usual case) each entry's
    column is looked up block by block while packing (after slicing away, in scipy's C
    code, the columns no panel peak uses); otherwise the counts are multiplied by the
    column → panel map. Explicitly stored zeros count as closed; the caller's matrix is
    never modified.
    """
    counts = counts.tocsr()
    if counts.nnz and counts.data.min() <= 0:  # explicitly stored zeros: drop them (in a copy)
        counts = sp.csr_matrix((counts.data > 0, counts.indices, counts.indptr), shape=counts.shape, copy=True)
        counts.eliminate_zeros()
    if match.lookup is not None and match.maps_every_column:  # e.g. a panel of every peak
        return _pack_rows(counts.indptr, counts.indices, n_bytes, match.lookup)
    if match.lookup is not None:
        columns = np.flatnonzero(match.lookup >= 0)
        sub = counts[:, columns]
        return _pack_rows(sub.indptr, sub.indices, n_bytes, match.lookup[columns])
    sub = counts @ match.matrix
    return _pack_rows(sub.indptr, sub.indices, n_bytes)


def _pack_rows(indptr: np.ndarray, columns: np.ndarray, n_bytes: int, lookup: np.ndarray | None = None) -> np.ndarray:
    """Set bit ``lookup[columns[k]]`` (or ``columns[k]``) of row ``r`` for each entry ``k`` of row ``r``.

    Rows are packed a scratch block at a time, and the lookup is done per block too, so
    that every temporary stays in cache and is reused.
    """
    n_rows, n_bits = indptr.size - 1, n_bytes * 8
    out = np.empty((n_rows, n_bytes), dtype=np.uint8)
    block = max(1, SCRATCH_BITS // max(n_bits, 1))
    scratch = np.zeros(block * n_bits, dtype=bool)
    for lo in range(0, n_rows, block):
        hi = min(lo + block, n_rows)
        a, b = int(indptr[lo]), int(indptr[hi])
        targets = columns[a:b] if lookup is None else lookup[columns[a:b]]
        flat = np.repeat(np.arange(hi - lo, dtype=np.int64) * n_bits, np.diff(indptr[lo : hi + 1])) + targets
        scratch[flat] = True
        out[lo:hi] = np.packbits(scratch[: (hi - lo) * n_bits].reshape(hi - lo, n_bits), axis=1, bitorder="little")
        scratch[flat] = False  # cheaper than clearing the whole block
    return out
