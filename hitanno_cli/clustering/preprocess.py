"""From a count matrix to model inputs, as AttentionAE-sc: kept cells, features, size factors.

scRNA-seq (``modality="rna"``): drop empty cells and genes, normalise every cell to
1e4 counts, log1p, keep the top ``n_hvg`` highly variable genes by normalised
dispersion (the Seurat flavour), z-score each gene. The raw counts of those genes are
the ZINB target and ``size factor = cell total / median cell total``.

scATAC-seq (``modality="atac"``): binarise, TF-IDF (:mod:`hitanno_cli.tfidf`, on the
binary matrix), LSI (30-component truncated SVD, first component dropped), centred and divided by one common
scale (not per component, which would inflate the noise components). The
reconstruction target is the binary accessibility of the ``n_hvg`` peaks that weigh most
in the LSI (:func:`informative_peaks`); size factor = open peaks per cell / median.

Everything stays scipy-sparse; the z-scored input is made dense one batch of cells at a
time (:meth:`Features.rows`), so memory grows with non-zeros, not cells × genes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from hitanno_cli.clustering.counts import Counts, highly_variable, mean_var, normalise_log1p, read_counts, row_sums
from hitanno_cli.errors import UserError
from hitanno_cli.tfidf import tfidf

__all__ = ["Counts", "Features", "Prepared", "Transform", "apply", "describe", "pca", "prepare", "read_counts"]

#: LSI components computed for scATAC-seq (the first is dropped: it tracks depth).
N_LSI = 30


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
        return Prepared(
            self.modality,
            self.cell_ids[idx],
            self.kept,
            self.n_input_cells,
            self.features.subset(idx),
            self.target[idx],
            self.size_factors[idx],
            self.transform,
            None if self.labels is None else self.labels[idx],
        )


def _prepared(
    counts: Counts,
    kept: np.ndarray,
    *,
    features: Features,
    target: sp.csr_matrix,
    depth: np.ndarray,
    transform: Transform,
) -> Prepared:
    """The kept cells' model input, with size factors ``depth / median depth``."""
    return Prepared(
        transform.modality,
        counts.cell_ids[kept],
        kept,
        counts.matrix.shape[0],
        features,
        target,
        (depth / np.median(depth)).astype(np.float32),
        transform,
        None if counts.labels is None else counts.labels[kept],
    )


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
    """scRNA-seq counts to model inputs, as published (see the module docstring)."""
    matrix, kept = _keep_cells(counts)
    gene_totals = np.asarray(matrix.sum(axis=0)).ravel()
    genes = np.flatnonzero(gene_totals > 0)
    matrix = matrix[:, genes]
    totals = row_sums(matrix)
    lognorm = normalise_log1p(matrix)
    hvg = highly_variable(lognorm, n_hvg)
    x = lognorm[:, hvg].tocsr()
    mean, std = zscore_stats(x)
    names = [str(n) for n in counts.features[genes][hvg]]
    transform = Transform("rna", names, np.arange(len(names)), {"mean": mean, "std": std})
    return _prepared(
        counts, kept, features=Features(x, mean, std), target=matrix[:, hvg].tocsr(), depth=totals, transform=transform
    )


def _model_columns(counts: Counts, transform: Transform, what: str) -> np.ndarray:
    """Columns of ``counts`` holding the saved model's input features, in the model's order;
    refuse data that lacks any of them (``what`` names them: genes or peaks)."""
    column = {str(n): i for i, n in enumerate(counts.features)}
    missing = [f for f in transform.input_features if f not in column]
    if missing:
        raise UserError(
            f"{len(missing)} of the model's {what} are missing from the data (e.g. '{missing[0]}')",
            f"pass data with the {what} the model was trained on",
        )
    return np.array([column[f] for f in transform.input_features])


def apply_rna(counts: Counts, transform: Transform) -> Prepared:
    """Preprocess new counts with a saved model's genes and z-score statistics."""
    matrix, kept = _keep_cells(counts)
    cols = _model_columns(counts, transform, "genes")
    totals = row_sums(matrix)
    lognorm = normalise_log1p(matrix)
    x = lognorm[:, cols].tocsr()
    mean, std = transform.tensors["mean"], transform.tensors["std"]
    return _prepared(
        counts, kept, features=Features(x, mean, std), target=matrix[:, cols].tocsr(), depth=totals, transform=transform
    )


def _binary(matrix: sp.csr_matrix) -> sp.csr_matrix:
    out = matrix.copy()
    out.data = np.ones_like(out.data, dtype=np.float32)
    return out


def _lsi(binary: sp.csr_matrix, idf_total: np.ndarray, n_cells_ref: int, components: np.ndarray) -> np.ndarray:
    """LSI coordinates: TF-IDF projected on the SVD components, first dropped."""
    values = tfidf(binary, row_sums(binary), idf_total, n_cells_ref)
    return np.asarray(values @ components.T, dtype=np.float32)[:, 1:]


def informative_peaks(svd: Any, n_targets: int) -> np.ndarray:
    """Indices (ascending) of the ``n_targets`` peaks carrying most of the LSI's variance
    beyond its first component: ``Σ_k (σ_k v_kp)²`` over components 2... The most often
    open peaks, the obvious alternative, are open in most cells of every type and teach
    the autoencoder little about types."""
    weight = (svd.components_[1:].astype(np.float64) ** 2 * svd.singular_values_[1:, None] ** 2).sum(axis=0)
    order = np.lexsort((np.arange(weight.size), -weight))
    return np.sort(order[: min(n_targets, weight.size)])


def prepare_atac(counts: Counts, n_targets: int, seed: int) -> Prepared:
    """Binarise, TF-IDF, LSI (components 2..30), centre and scale; Bernoulli targets on
    the peaks that vary most in the LSI (:func:`informative_peaks`)."""
    from sklearn.decomposition import TruncatedSVD

    matrix, kept = _keep_cells(counts)
    binary = _binary(matrix)
    peak_totals = np.asarray(binary.sum(axis=0), dtype=np.float64).ravel()
    peaks = np.flatnonzero(peak_totals > 0)
    binary, peak_totals = binary[:, peaks].tocsr(), peak_totals[peaks]
    n_comp = min(N_LSI, binary.shape[0] - 1, binary.shape[1] - 1)
    if n_comp < 2:
        raise UserError(
            f"{binary.shape[0]} cells × {binary.shape[1]} open peaks is too small for LSI", "pass more cells and peaks"
        )
    values = tfidf(binary, row_sums(binary), peak_totals, binary.shape[0])
    svd = TruncatedSVD(n_components=n_comp, random_state=seed).fit(values)
    components = svd.components_.astype(np.float32)
    lsi = _lsi(binary, peak_totals, binary.shape[0], components)
    # centred, and scaled by one number: z-scoring each component would give the many
    # noise components as much weight as the few that carry the structure
    mean, std = zscore_stats(lsi)
    std = np.full_like(std, np.sqrt(np.mean(std.astype(np.float64) ** 2)))
    targets = informative_peaks(svd, n_targets)
    open_per_cell = row_sums(binary)
    names = [str(n) for n in counts.features[peaks]]
    transform = Transform(
        "atac",
        names,
        targets,
        {
            "peak_totals": peak_totals.astype(np.float32),
            "n_cells": np.array([binary.shape[0]], np.int64),
            "components": components,
            "mean": mean,
            "std": std,
        },
    )
    return _prepared(
        counts,
        kept,
        features=Features(lsi, mean, std),
        target=binary[:, targets].tocsr(),
        depth=open_per_cell,
        transform=transform,
    )


def apply_atac(counts: Counts, transform: Transform) -> Prepared:
    """LSI of new data through a saved model's IDF and SVD components."""
    matrix, kept = _keep_cells(counts)
    cols = _model_columns(counts, transform, "peaks")
    binary = _binary(matrix)[:, cols].tocsr()
    t = transform.tensors
    lsi = _lsi(binary, t["peak_totals"].astype(np.float64), int(t["n_cells"][0]), t["components"])
    open_per_cell = np.maximum(row_sums(binary), 1.0)
    return _prepared(
        counts,
        kept,
        features=Features(lsi, t["mean"], t["std"]),
        target=binary[:, transform.target_index].tocsr(),
        depth=open_per_cell,
        transform=transform,
    )


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
    return (
        PCA(n_components=n_components, random_state=seed).fit_transform(features.rows(slice(None))).astype(np.float32)
    )


def describe(prepared: Prepared) -> dict[str, Any]:
    """A summary for logs and ``metrics.json``."""
    return {
        "modality": prepared.modality,
        "n_cells": prepared.n_cells,
        "n_input_cells": prepared.n_input_cells,
        "n_empty_cells": int(prepared.n_input_cells - prepared.n_cells),
        "n_features": prepared.features.n_features,
        "n_targets": int(prepared.target.shape[1]),
    }
