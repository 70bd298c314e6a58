"""From a count matrix to model inputs (SPEC §2.1): kept cells, features, size factors.

scRNA-seq (``modality="rna"``): drop empty cells and genes, normalise every cell to
1e4 counts, log1p, keep the top ``n_hvg`` highly variable genes by normalised
dispersion (the Seurat flavour), z-score each gene. The raw counts of those genes are
the ZINB target and ``size factor = cell total / median cell total``.

scATAC-seq (``modality="atac"``): binarise, TF-IDF (SPEC §1.2 formula on the binary
matrix), LSI (truncated SVD, first component dropped), centred and divided by one common
scale (not per component, which would inflate the noise components). The
reconstruction target is the binary accessibility of the ``n_hvg`` most often open
peaks; size factor = open peaks per cell / median.

Everything stays scipy-sparse; the z-scored input is made dense one batch of cells at a
time (:meth:`Features.rows`), so memory grows with non-zeros, not cells × genes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from hitanno_cli.errors import UserError
from hitanno_cli.h5ad import H5ad, check_counts
from hitanno_cli.selection import tfidf

#: Counts per cell after normalisation (SPEC §2.1).
TARGET_SUM = 1e4
#: Mean-expression bins of the Seurat-flavour dispersion normalisation.
N_BINS = 20
#: LSI components computed for scATAC-seq (the first is dropped: it tracks depth).
N_LSI = 50


@dataclass
class Counts:
    """The count matrix of an ``.h5ad`` with its cell and feature names (all in memory)."""

    matrix: sp.csr_matrix
    cell_ids: np.ndarray
    features: np.ndarray
    labels: np.ndarray | None = None


def read_counts(path: str | Path, label_key: str | None = None, layer: str | None = None,
                integer: bool = True) -> Counts:
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
                raise UserError(f"{path} has negative or non-finite values (rows from {row})",
                                "pass raw counts or a binary accessibility matrix")
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


@dataclass
class Features:
    """The model's input: z-scored features, made dense one batch of cells at a time.

    ``matrix`` is either sparse (scRNA-seq: log-normalised HVG expression) or dense
    (scATAC-seq: LSI coordinates); ``rows(idx)`` returns ``(matrix[idx] - mean) / std``.
    """

    matrix: sp.csr_matrix | np.ndarray
    mean: np.ndarray
    std: np.ndarray

    @property
    def n_cells(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.matrix.shape[1])

    def rows(self, idx: np.ndarray | slice) -> np.ndarray:
        block = self.matrix[idx]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        return ((block - self.mean) / self.std).astype(np.float32)

    def subset(self, idx: np.ndarray) -> Features:
        return Features(self.matrix[idx], self.mean, self.std)


def zscore_stats(matrix: sp.csr_matrix | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and standard deviation (ddof 0, as ``sklearn.preprocessing.scale``);
    a constant column gets standard deviation 1."""
    if sp.issparse(matrix):
        mean, var = mean_var(matrix)
    else:
        mean, var = matrix.mean(axis=0, dtype=np.float64), matrix.var(axis=0, dtype=np.float64)
    std = np.sqrt(var)
    std[std == 0] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


@dataclass
class Transform:
    """What turns a new data set's counts into this model's input (saved with the model)."""

    modality: str
    input_features: list[str]  # genes (rna) or peaks (atac) read from the data
    target_index: np.ndarray  # columns of input_features that are reconstruction targets
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def target_features(self) -> list[str]:
        return [self.input_features[i] for i in self.target_index]


@dataclass
class Prepared:
    """Model-ready data for the kept cells."""

    modality: str
    cell_ids: np.ndarray  # ids of the kept cells
    kept: np.ndarray  # bool over the input cells: has counts
    n_input_cells: int
    features: Features
    target: sp.csr_matrix  # reconstruction target (raw counts or binary), cells × targets
    size_factors: np.ndarray  # float32, per kept cell
    transform: Transform
    labels: np.ndarray | None = None  # of the kept cells

    @property
    def n_cells(self) -> int:
        return int(self.cell_ids.size)

    def subset(self, idx: np.ndarray) -> Prepared:
        """The same data restricted to kept cells ``idx`` (features keep their statistics)."""
        return Prepared(self.modality, self.cell_ids[idx], self.kept, self.n_input_cells,
                        self.features.subset(idx), self.target[idx], self.size_factors[idx],
                        self.transform, None if self.labels is None else self.labels[idx])


def _keep_cells(counts: Counts) -> tuple[sp.csr_matrix, np.ndarray]:
    totals = row_sums(counts.matrix)
    kept = totals > 0
    if not kept.any():
        raise UserError("every cell of the input has zero counts", "pass a matrix of raw counts")
    gene_totals = np.asarray(counts.matrix[kept].sum(axis=0)).ravel()
    if not np.any(gene_totals > 0):
        raise UserError("every gene of the input has zero counts", "pass a matrix of raw counts")
    return counts.matrix[kept], kept


def prepare_rna(counts: Counts, n_hvg: int) -> Prepared:
    """SPEC §2.1 for scRNA-seq counts."""
    matrix, kept = _keep_cells(counts)
    gene_totals = np.asarray(matrix.sum(axis=0)).ravel()
    genes = np.flatnonzero(gene_totals > 0)
    matrix = matrix[:, genes]
    totals = row_sums(matrix)
    size_factors = (totals / np.median(totals)).astype(np.float32)
    lognorm = normalise_log1p(matrix)
    hvg = highly_variable(lognorm, n_hvg)
    x = lognorm[:, hvg].tocsr()
    mean, std = zscore_stats(x)
    names = [str(n) for n in counts.features[genes][hvg]]
    transform = Transform("rna", names, np.arange(len(names)), {"mean": mean, "std": std})
    return Prepared("rna", counts.cell_ids[kept], kept, counts.matrix.shape[0], Features(x, mean, std),
                    matrix[:, hvg].tocsr(), size_factors, transform,
                    None if counts.labels is None else counts.labels[kept])


def _model_columns(counts: Counts, transform: Transform, what: str) -> np.ndarray:
    """Columns of ``counts`` holding the saved model's input features, in the model's order;
    refuse data that lacks any of them (``what`` names them: genes or peaks)."""
    column = {str(n): i for i, n in enumerate(counts.features)}
    missing = [f for f in transform.input_features if f not in column]
    if missing:
        raise UserError(f"{len(missing)} of the model's {what} are missing from the data (e.g. '{missing[0]}')",
                        f"pass data with the {what} the model was trained on")
    return np.array([column[f] for f in transform.input_features])


def apply_rna(counts: Counts, transform: Transform) -> Prepared:
    """Preprocess new counts with a saved model's genes and z-score statistics."""
    matrix, kept = _keep_cells(counts)
    cols = _model_columns(counts, transform, "genes")
    totals = row_sums(matrix)
    lognorm = normalise_log1p(matrix)
    x = lognorm[:, cols].tocsr()
    mean, std = transform.tensors["mean"], transform.tensors["std"]
    return Prepared("rna", counts.cell_ids[kept], kept, counts.matrix.shape[0], Features(x, mean, std),
                    matrix[:, cols].tocsr(), (totals / np.median(totals)).astype(np.float32), transform,
                    None if counts.labels is None else counts.labels[kept])


def _binary(matrix: sp.csr_matrix) -> sp.csr_matrix:
    out = matrix.copy()
    out.data = np.ones_like(out.data, dtype=np.float32)
    return out


def _lsi(binary: sp.csr_matrix, idf_total: np.ndarray, n_cells_ref: int, components: np.ndarray) -> np.ndarray:
    """LSI coordinates: TF-IDF projected on the SVD components, first dropped."""
    values = tfidf(binary, row_sums(binary), idf_total, n_cells_ref)
    return np.asarray(values @ components.T, dtype=np.float32)[:, 1:]


def prepare_atac(counts: Counts, n_targets: int, seed: int) -> Prepared:
    """Binarise, TF-IDF, LSI (components 2..50), centre and scale; Bernoulli targets on
    the most often open peaks."""
    from sklearn.decomposition import TruncatedSVD

    matrix, kept = _keep_cells(counts)
    binary = _binary(matrix)
    peak_totals = np.asarray(binary.sum(axis=0), dtype=np.float64).ravel()
    peaks = np.flatnonzero(peak_totals > 0)
    binary, peak_totals = binary[:, peaks].tocsr(), peak_totals[peaks]
    n_comp = min(N_LSI, binary.shape[0] - 1, binary.shape[1] - 1)
    if n_comp < 2:
        raise UserError(f"{binary.shape[0]} cells × {binary.shape[1]} open peaks is too small for LSI",
                        "pass more cells and peaks")
    values = tfidf(binary, row_sums(binary), peak_totals, binary.shape[0])
    svd = TruncatedSVD(n_components=n_comp, random_state=seed).fit(values)
    components = svd.components_.astype(np.float32)
    lsi = _lsi(binary, peak_totals, binary.shape[0], components)
    # centred, and scaled by one number: z-scoring each component would give the many
    # noise components as much weight as the few that carry the structure
    mean, std = zscore_stats(lsi)
    std = np.full_like(std, np.sqrt(np.mean(std.astype(np.float64) ** 2)))
    targets = np.sort(np.lexsort((np.arange(peaks.size), -peak_totals))[: min(n_targets, peaks.size)])
    open_per_cell = row_sums(binary)
    names = [str(n) for n in counts.features[peaks]]
    transform = Transform("atac", names, targets, {
        "peak_totals": peak_totals.astype(np.float32), "n_cells": np.array([binary.shape[0]], np.int64),
        "components": components, "mean": mean, "std": std})
    return Prepared("atac", counts.cell_ids[kept], kept, counts.matrix.shape[0], Features(lsi, mean, std),
                    binary[:, targets].tocsr(), (open_per_cell / np.median(open_per_cell)).astype(np.float32),
                    transform, None if counts.labels is None else counts.labels[kept])


def apply_atac(counts: Counts, transform: Transform) -> Prepared:
    """LSI of new data through a saved model's IDF and SVD components."""
    matrix, kept = _keep_cells(counts)
    cols = _model_columns(counts, transform, "peaks")
    binary = _binary(matrix)[:, cols].tocsr()
    t = transform.tensors
    lsi = _lsi(binary, t["peak_totals"].astype(np.float64), int(t["n_cells"][0]), t["components"])
    open_per_cell = np.maximum(row_sums(binary), 1.0)
    return Prepared("atac", counts.cell_ids[kept], kept, counts.matrix.shape[0],
                    Features(lsi, t["mean"], t["std"]), binary[:, transform.target_index].tocsr(),
                    (open_per_cell / np.median(open_per_cell)).astype(np.float32), transform,
                    None if counts.labels is None else counts.labels[kept])


def prepare(counts: Counts, modality: str, n_hvg: int, seed: int) -> Prepared:
    """Preprocess freshly read counts for training."""
    if modality == "rna":
        return prepare_rna(counts, n_hvg)
    return prepare_atac(counts, n_hvg, seed)


def apply(counts: Counts, transform: Transform) -> Prepared:
    """Preprocess new counts exactly as a saved model's training data was."""
    return apply_rna(counts, transform) if transform.modality == "rna" else apply_atac(counts, transform)


def pca(features: Features, n_components: int, seed: int) -> np.ndarray:
    """PCA of the z-scored features without densifying them (sparse, implicit centring)."""
    from sklearn.decomposition import PCA

    n_components = min(n_components, features.n_cells - 1, features.n_features)
    matrix = features.matrix
    if sp.issparse(matrix):
        scaled = matrix @ sp.diags(1.0 / features.std.astype(np.float64))
        model = PCA(n_components=n_components, svd_solver="arpack", random_state=seed)
        return model.fit_transform(scaled.tocsr()).astype(np.float32)
    return PCA(n_components=n_components, random_state=seed).fit_transform(
        features.rows(slice(None))).astype(np.float32)


def describe(prepared: Prepared) -> dict[str, Any]:
    """A summary for logs and ``metrics.json``."""
    return {"modality": prepared.modality, "n_cells": prepared.n_cells,
            "n_input_cells": prepared.n_input_cells,
            "n_empty_cells": int(prepared.n_input_cells - prepared.n_cells),
            "n_features": prepared.features.n_features, "n_targets": int(prepared.target.shape[1])}
