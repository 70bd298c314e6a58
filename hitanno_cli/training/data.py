"""The training cells: labels, the validation split, sampling, augmentation and the
reference statistics that initialise the model."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from hitanno_cli.batches import sequential_batches
from hitanno_cli.errors import UserError
from hitanno_cli.sentences import OpenRows, SentenceStore
from hitanno_cli.tfidf import binary_tfidf


def training_labels(store: SentenceStore) -> tuple[np.ndarray, np.ndarray]:
    """Rows of labelled cells and their class indices (panel order); refuse unknown labels."""
    labels = store.labels()
    if labels is None:
        raise UserError(f"{store.path} was encoded without labels", "re-encode the reference with --label-key")
    index = {name: i for i, name in enumerate(store.cell_types)}
    known = labels != ""
    unknown = sorted({str(v) for v in labels[known] if v not in index})
    if unknown:
        raise UserError(
            f"{store.path} has labels that are not cell types of its panel: {', '.join(unknown[:5])}",
            "encode the reference the panel was selected from, with the same --label-key",
        )
    rows = np.flatnonzero(known)
    if len(rows) < 2:
        raise UserError(f"{store.path} has fewer than 2 labelled cells", "train on a labelled reference")
    return rows, np.array([index[v] for v in labels[rows]], dtype=np.int64)


def stratified_split(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation): ``fraction`` of each class held out, at least one
    cell of each class with two or more cells."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == c))
        n_val = int(round(len(members) * fraction))
        if fraction > 0 and len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def effective_batch_size(batch_size: int, min_steps: int, n_cells: int) -> int:
    """``batch_size``, shrunk so that ``n_cells`` make at least ``min_steps`` updates per epoch
    (a few hundred reference cells at batch 256 would make 2; 0 turns this off)."""
    if min_steps <= 0:
        return batch_size
    return max(1, min(batch_size, n_cells // min_steps))


def sampling_rates(targets: np.ndarray, n_types: int, mode: str) -> np.ndarray | None:
    """Relative draw rate per class for ``--sampling`` (None: each cell once per epoch)."""
    if mode == "uniform":
        return None
    counts = np.maximum(np.bincount(targets, minlength=n_types), 1).astype(np.float64)
    return 1.0 / (counts if mode == "balanced" else np.sqrt(counts))


def class_weights(targets: np.ndarray, n_types: int, mode: str) -> torch.Tensor | None:
    """``balanced``: ``n / (k · count_c)`` over classes present (absent classes weigh 0)."""
    if mode == "none":
        return None
    counts = np.bincount(targets, minlength=n_types).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_types)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def drop_open_peaks(cells: OpenRows, max_rate: float, rng: np.random.Generator) -> OpenRows:
    """Depth augmentation: each cell loses a random share ``U(0, max_rate)`` of its open peaks."""
    lengths = np.diff(cells.indptr)
    rate = np.repeat(rng.uniform(0.0, max_rate, size=cells.n), lengths)
    keep = rng.random(len(cells.positions)) >= rate
    indptr = np.zeros_like(cells.indptr)
    np.cumsum(np.bincount(np.repeat(np.arange(cells.n), lengths)[keep], minlength=cells.n), out=indptr[1:])
    return OpenRows(indptr, cells.positions[keep])


def reference_tfidf(store: SentenceStore, rows: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """The TF-IDF of the cells ``rows`` over the panel positions, and every position's idf
    (``n_cells / n_open``; 0 where no cell is open)."""
    cells = OpenRows.concat([batch.open for batch in sequential_batches(store, rows, 4096)])
    return binary_tfidf(cells.indptr, cells.positions, store.n_positions)


def lsi_peak_embeddings(tfidf: sp.csr_matrix, dim: int, seed: int) -> torch.Tensor:
    """Peak identity embeddings from an LSI of the training cells' TF-IDF: each panel
    position's loadings on the top ``dim`` components, scaled by their singular values and
    overall to the random initialisation's size (std 0.02)."""
    from sklearn.utils.extmath import randomized_svd

    k = min(dim, min(tfidf.shape) - 1)
    _, singular, components = randomized_svd(tfidf, k, random_state=seed)
    loadings = np.zeros((tfidf.shape[1], dim))
    loadings[:, :k] = components.T * singular
    loadings *= 0.02 / max(float(np.sqrt((loadings**2).mean())), 1e-12)
    return torch.tensor(loadings, dtype=torch.float32)
