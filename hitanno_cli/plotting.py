"""Pictures: matplotlib set up for files (no display), and the 2-D map of embeddings."""

from __future__ import annotations

import importlib.util
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
    if n > 3 and importlib.util.find_spec("umap") is not None:
        return _umap(embeddings, min(15, n - 1), seed), "UMAP"
    from sklearn.decomposition import PCA

    return PCA(n_components=min(2, n, embeddings.shape[1]), random_state=seed).fit_transform(embeddings), "PCA"


def _umap(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """umap-learn's layout with its defaults (spread 1, min_dist 0.1, spectral start) of the
    fuzzy graph of each point's ``k`` nearest points (itself counted), as ``scanpy.tl.umap``
    lays out a graph it already has.

    The graph is :func:`~hitanno_cli.clustering.graph.umap_connectivities` of an exact
    search: umap-learn's own graph step is compiled anew by numba in every process
    (seconds, for any number of points)."""
    from umap.umap_ import find_ab_params, simplicial_set_embedding  # type: ignore[import-not-found]

    from hitanno_cli.clustering.graph import nearest_neighbors, umap_connectivities

    indices, distances = nearest_neighbors(points, k - 1, "euclidean")
    graph = umap_connectivities(indices, distances, k)
    a, b = find_ab_params(1.0, 0.1)
    layout, _ = simplicial_set_embedding(
        data=points,
        graph=graph,
        n_components=2,
        initial_alpha=1.0,
        a=a,
        b=b,
        gamma=1.0,
        negative_sample_rate=5,
        n_epochs=None,  # umap-learn's default: 500 up to 10 000 points, 200 above
        init="spectral",
        random_state=np.random.RandomState(seed),
        metric="euclidean",
        metric_kwds={},
        densmap=False,
        densmap_kwds={},
        output_dens=False,
    )
    return np.asarray(layout)
