"""Simulated scRNA-seq counts with known clusters (tests and the 50 000-cell benchmark).

Each cluster multiplies the expression of its own marker genes by ``fold``; counts are
negative binomial (gamma–Poisson) around ``library size × profile``. Cells are made in
blocks, so memory is bounded by one block whatever the number of cells.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp


def simulate_counts(
    n_cells: int,
    n_genes: int,
    n_clusters: int,
    *,
    seed: int = 0,
    markers: int = 40,
    fold: float = 4.0,
    mean_library: float = 2000.0,
    dispersion: float = 5.0,
    block: int = 4096,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """``(counts [cells × genes] CSR float32, cluster of each cell)``."""
    rng = np.random.default_rng(seed)
    base = rng.lognormal(mean=0.0, sigma=1.5, size=n_genes)
    profiles = np.tile(base, (n_clusters, 1))
    for c in range(n_clusters):
        genes = rng.choice(n_genes, size=min(markers, n_genes), replace=False)
        profiles[c, genes] *= fold
    profiles /= profiles.sum(axis=1, keepdims=True)
    weights = rng.dirichlet(np.full(n_clusters, 5.0))
    clusters = rng.choice(n_clusters, size=n_cells, p=weights)
    blocks = []
    for lo in range(0, n_cells, block):
        hi = min(lo + block, n_cells)
        library = rng.lognormal(np.log(mean_library), 0.4, size=hi - lo)
        mean = profiles[clusters[lo:hi]] * library[:, None]
        rate = rng.gamma(dispersion, mean / dispersion)
        blocks.append(sp.csr_matrix(rng.poisson(rate).astype(np.float32)))
    return sp.vstack(blocks, format="csr"), clusters


def write_counts_h5ad(
    path: str | Path, n_cells: int, n_genes: int, n_clusters: int, *, seed: int = 0, **kwargs: Any
) -> Path:
    """Simulate and write an ``.h5ad`` with ``obs['cluster']`` holding the truth."""
    import anndata as ad

    counts, clusters = simulate_counts(n_cells, n_genes, n_clusters, seed=seed, **kwargs)
    obs = pd.DataFrame(
        {"cluster": pd.Categorical([f"c{c}" for c in clusters])}, index=[f"cell{i}" for i in range(n_cells)]
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    path = Path(path)
    ad.AnnData(X=counts, obs=obs, var=var).write_h5ad(path)
    return path
