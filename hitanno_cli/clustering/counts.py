"""Count matrices read whole, and the statistics of scRNA-seq preprocessing: library-size
normalisation, log1p and the highly variable genes (Seurat flavour), all scipy-sparse."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from hitanno_cli.errors import UserError
from hitanno_cli.h5ad import H5ad, check_counts

#: Counts per cell after normalisation (as published).
TARGET_SUM = 1e4
#: Mean-expression bins of the Seurat-flavour dispersion normalisation.
N_BINS = 20


@dataclass
class Counts:
    """The count matrix of an ``.h5ad`` with its cell and feature names (all in memory)."""

    matrix: sp.csr_matrix
    cell_ids: np.ndarray
    features: np.ndarray
    labels: np.ndarray | None = None


def read_counts(
    path: str | Path, label_key: str | None = None, layer: str | None = None, integer: bool = True
) -> Counts:
    """Read the whole count matrix (CSR float32), refusing values that are not counts.

    ``integer`` also refuses fractional values (what the ZINB loss needs); otherwise
    only negative and non-finite values are refused.
    """
    with H5ad(path, layer=layer) as h5:
        labels = h5.labels(label_key) if label_key is not None else None  # refuse a bad key first
        blocks = []
        for row, chunk in h5.iter_chunks():
            if integer:
                check_counts(chunk.data, path, row)
            elif chunk.data.size and (not np.all(np.isfinite(chunk.data)) or chunk.data.min() < 0):
                raise UserError(
                    f"{path} has negative or non-finite values (rows from {row})",
                    "pass raw counts or a binary accessibility matrix",
                )
            blocks.append(chunk.astype(np.float32))
        matrix = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, h5.n_vars), dtype=np.float32)
        matrix.sum_duplicates()
        matrix.eliminate_zeros()
        return Counts(matrix, h5.obs_names(), h5.var_names(), labels)


def row_sums(x: sp.csr_matrix) -> np.ndarray:
    return np.asarray(x.sum(axis=1), dtype=np.float64).ravel()


def mean_var(x: sp.csr_matrix, ddof: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and variance of a sparse matrix (zeros included), float64."""
    n = x.shape[0]
    mean = np.asarray(x.sum(axis=0), dtype=np.float64).ravel() / n
    sq = np.asarray(x.multiply(x).sum(axis=0), dtype=np.float64).ravel() / n
    var = np.maximum(sq - mean**2, 0.0)
    if ddof:
        var *= n / max(n - ddof, 1)
    return mean, var


def normalise_log1p(counts: sp.csr_matrix, target_sum: float = TARGET_SUM) -> sp.csr_matrix:
    """``log1p(count / cell_total * target_sum)``, sparse; cells must have counts."""
    totals = row_sums(counts)
    scale = np.repeat(target_sum / totals, np.diff(counts.indptr))
    data = np.log1p(counts.data.astype(np.float64) * scale).astype(np.float32)
    return sp.csr_matrix((data, counts.indices.copy(), counts.indptr.copy()), shape=counts.shape)


def highly_variable(lognorm: sp.csr_matrix, n_top: int, n_bins: int = N_BINS) -> np.ndarray:
    """Indices (ascending) of the ``n_top`` genes of highest normalised dispersion.

    The Seurat flavour of ``scanpy.pp.highly_variable_genes``: mean and variance of the
    normalised counts ``expm1(lognorm)``; dispersion = variance / mean; log of both;
    genes binned into ``n_bins`` equal-width bins of log mean; dispersion z-scored within
    its bin (a bin holding one gene gives it 1). Genes of zero mean are never chosen.
    """
    expr = lognorm.copy()
    expr.data = np.expm1(expr.data.astype(np.float64))
    mean, var = mean_var(expr, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = np.log(dispersion)
        log_mean = np.log1p(mean)
    valid = np.isfinite(dispersion)
    norm = np.full(mean.shape, -np.inf)
    if valid.any():
        edges = np.linspace(log_mean.min(), log_mean.max(), n_bins + 1)  # pandas.cut(bins=n_bins)
        bins = np.clip(np.searchsorted(edges, log_mean[valid], side="left") - 1, 0, n_bins - 1)
        disp = dispersion[valid]
        count = np.bincount(bins, minlength=n_bins)
        bin_mean = np.bincount(bins, weights=disp, minlength=n_bins) / np.maximum(count, 1)
        sq = np.bincount(bins, weights=(disp - bin_mean[bins]) ** 2, minlength=n_bins)
        with np.errstate(divide="ignore", invalid="ignore"):
            bin_std = np.sqrt(sq / (count - 1))  # pandas' std (ddof 1)
            single = count == 1
            bin_std[single], bin_mean[single] = bin_mean[single], 0.0
            values = (disp - bin_mean[bins]) / bin_std[bins]
        norm[valid] = np.where(np.isfinite(values), values, -np.inf)
    order = np.lexsort((np.arange(mean.size), -norm))  # highest first, ties by index
    chosen = order[: min(n_top, int(np.count_nonzero(mean > 0)))]
    return np.sort(chosen)
