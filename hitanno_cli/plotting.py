"""Pictures: matplotlib set up for files (no display), and the 2-D map of embeddings."""

from __future__ import annotations

import warnings
from types import ModuleType

import numpy as np


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` drawing to files only (the Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def two_d(embeddings: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """A 2-D map of embeddings and its method: UMAP (15 neighbours, as scanpy), or PCA where
    UMAP cannot run (too few cells, or umap-learn missing), which the caller's caption says."""
    n = len(embeddings)
    if n > 3:
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            pass
        else:
            k = min(15, n - 1)
            knn = _neighbours(embeddings, k)  # exact and quick in a few dimensions; spares UMAP's JIT-compiled search
            reducer = umap.UMAP(n_neighbors=k, random_state=seed, n_jobs=1, precomputed_knn=knn)
            with warnings.catch_warnings():  # that a map of these neighbours cannot transform new cells
                warnings.simplefilter("ignore", UserWarning)
                return np.asarray(reducer.fit_transform(embeddings)), "UMAP"
    from sklearn.decomposition import PCA

    return PCA(n_components=min(2, n, embeddings.shape[1]), random_state=seed).fit_transform(embeddings), "PCA"


def _neighbours(points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each point's ``k`` nearest points (itself first) as UMAP's ``(indices, distances)``."""
    from sklearn.neighbors import NearestNeighbors

    distances, indices = NearestNeighbors(n_neighbors=k).fit(points).kneighbors(points)
    return indices, distances.astype(np.float32)
