"""TF-IDF of accessibility counts, the one formula every part of hitanno uses.

For a count ``x`` of peak ``p`` in cell ``c``::

    tfidf = log(1 + SCALE · (x / cell_total_c) · (n_cells / peak_total_p))

as HitAnno publishes it for peak selection. Selection applies it to raw counts; the
trainer's LSI start and the model's linear path to the binary open/closed states of the
panel (``x`` = 1, ``cell_total`` = the cell's open peaks); clustering of scATAC-seq to
binarised counts before its LSI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # scipy loads with the first matrix: `hitanno --help` stays quick
    import scipy.sparse as sp

#: The scale inside the logarithm (counts per 10 000).
SCALE = 1e4


def tfidf_entries(
    counts: np.ndarray, entry_total: np.ndarray, peaks: np.ndarray, peak_total: np.ndarray, n_cells: int
) -> np.ndarray:
    """TF-IDF of stored counts (float64), given each entry's cell total and peak."""
    # in place on one float64 array: the temporaries dominate select-peaks' memory traffic
    values = counts.astype(np.float64)
    values /= entry_total
    values *= (SCALE * n_cells) / peak_total[peaks]
    np.log1p(values, out=values)
    return values


def tfidf(counts: sp.csr_matrix, cell_total: np.ndarray, peak_total: np.ndarray, n_cells: int) -> sp.csr_matrix:
    """TF-IDF of a CSR matrix of counts.

    ``cell_total`` are the sums of ``counts``' rows, ``peak_total`` the column sums over
    the whole reference of ``n_cells`` cells (not only these rows).
    """
    import scipy.sparse as sp

    counts = counts.tocsr()
    entry_total = np.repeat(cell_total, np.diff(counts.indptr))
    values = tfidf_entries(counts.data, entry_total, counts.indices, peak_total, n_cells)
    return sp.csr_matrix((values, counts.indices, counts.indptr), shape=counts.shape)


def binary_tfidf(indptr: np.ndarray, positions: np.ndarray, n_positions: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """TF-IDF of cells given as CSR rows of open positions, and each position's idf.

    The idf is ``n_cells / n_open`` (0 where no cell is open): the weight the model's
    linear path gives an open peak.
    """
    import scipy.sparse as sp

    n_cells = indptr.size - 1
    ones = np.ones(positions.size)
    opened = np.bincount(positions, minlength=n_positions).astype(np.float64)
    matrix = tfidf(
        sp.csr_matrix((ones, positions, indptr), shape=(n_cells, n_positions)),
        np.maximum(np.diff(indptr), 1).astype(np.float64),
        np.maximum(opened, 1.0),
        n_cells,
    )
    idf = np.where(opened > 0, n_cells / np.maximum(opened, 1), 0.0)
    return matrix, idf
