"""Pictures: matplotlib set up for files (no display), and the 2-D map of embeddings."""

from __future__ import annotations

from types import ModuleType

import numpy as np


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` drawing to files only (the Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def two_d(embeddings: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """A 2-D map of embeddings and its method: UMAP when ``umap-learn`` is installed, else PCA."""
    try:
        import umap  # type: ignore[import-not-found]
    except ImportError:
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(embeddings), "PCA"
    return umap.UMAP(random_state=seed).fit_transform(embeddings), "UMAP"
