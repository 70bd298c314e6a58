"""The cell graph of AttentionAE-sc and Leiden clustering, all scipy-sparse.

Neighbours come from scikit-learn (exact, cosine by default). ``n_neighbors`` counts
the cell itself, as in ``scanpy.pp.neighbors`` which the published code calls: 15 means
the cell and its 14 nearest other cells. Two connectivities:

* ``gauss`` (Haghverdi et al. 2016, scanpy's ``method="gauss"``):
  ``w_ij = sqrt(2 s_i s_j / (s_i² + s_j²)) · exp(-d_ij² / (s_i² + s_j²))``.
  With ``knn=True`` the kernel is kept on the union of the kNN edges and ``s_i²`` is
  the median squared distance to the neighbours; with ``knn=False`` (the published
  graph) it is kept on all pairs (a weight under 1e-14 is dropped), the diagonal
  included, and ``s_i`` is half the distance to the last neighbour. Above
  :data:`DENSE_LIMIT` cells the all-pairs kernel is truncated to the
  ``SOFT_FACTOR × n_neighbors`` nearest cells so that the graph stays sparse.
* ``umap``: UMAP's fuzzy simplicial set (``local_connectivity=1``, union by the
  probabilistic t-conorm ``a + b - ab``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from hitanno_cli.errors import UserError

#: Up to this many cells, ``knn=False`` keeps the Gaussian kernel on all pairs.
DENSE_LIMIT = 4096
#: Above :data:`DENSE_LIMIT`, ``knn=False`` keeps this many × n_neighbors nearest cells.
SOFT_FACTOR = 10
#: Weights below this are dropped (scanpy's threshold).
MIN_WEIGHT = 1e-14
#: Cells whose neighbours are searched in one block of the exact search.
_BLOCK = 2048
#: scikit-learn's working memory for blocks of pairwise distances (MiB).
WORKING_MEMORY_MIB = 256


@dataclass(frozen=True)
class GraphConfig:
    """How the cell graph is built."""

    n_neighbors: int = 15
    connectivity: str = "gauss"
    knn: bool = True  # kNN edges only (default: sparse); False keeps the published soft graph
    metric: str = "cosine"
    #: Search neighbours on this many principal components of the features (0: on the
    #: features themselves up to 10 000 cells, PCA-50 above, as published).
    n_pcs: int = 50


def check_neighbors(n_cells: int, n_neighbors: int) -> None:
    """Refuse a graph with more neighbours than there are cells."""
    if n_cells < n_neighbors:
        raise UserError(
            f"only {n_cells} cells with counts, fewer than --n-neighbors {n_neighbors}",
            f"pass --n-neighbors {max(n_cells, 2)} or less, or more cells",
        )


def nearest_neighbors(x: np.ndarray, k: int, metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest *other* cells of every cell: ``(indices, distances)``, both
    ``[n, k]``, nearest first (exact search with scikit-learn)."""
    from sklearn import config_context
    from sklearn.neighbors import NearestNeighbors

    n = x.shape[0]
    k = min(k, n - 1)
    search = NearestNeighbors(n_neighbors=k + 1, metric=metric, algorithm="brute", n_jobs=1).fit(x)
    indices = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=np.float64)
    for lo in range(0, n, _BLOCK):
        hi = min(lo + _BLOCK, n)
        with config_context(working_memory=WORKING_MEMORY_MIB):
            dist, idx = search.kneighbors(x[lo:hi], return_distance=True)
        rows = np.arange(lo, hi)[:, None]
        is_self = idx == rows
        # drop the cell itself (or, for duplicated points not listed first, the farthest)
        drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
        keep = np.ones_like(idx, dtype=bool)
        keep[np.arange(hi - lo), drop] = False
        indices[lo:hi] = idx[keep].reshape(hi - lo, k)
        distances[lo:hi] = np.maximum(dist[keep].reshape(hi - lo, k), 0.0)
    return indices, distances


def _pair_weights(d2: np.ndarray, s2_i: np.ndarray, s2_j: np.ndarray) -> np.ndarray:
    den = s2_i + s2_j
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.sqrt(2.0 * np.sqrt(s2_i * s2_j) / den) * np.exp(-d2 / den)
    return np.nan_to_num(w, nan=0.0)


def gauss_knn(indices: np.ndarray, distances: np.ndarray) -> sp.csr_matrix:
    """Gaussian connectivities on the union of the kNN edges (``knn=True``)."""
    n = indices.shape[0]
    d2 = distances**2
    s2 = np.median(d2, axis=1)
    rows = np.repeat(np.arange(n), indices.shape[1])
    cols = indices.ravel()
    w = _pair_weights(d2.ravel(), s2[rows], s2[cols])
    graph = sp.csr_matrix((w, (rows, cols)), shape=(n, n))
    return graph.maximum(graph.T).tocsr()  # the weight is symmetric; this takes the union


def gauss_soft(x: np.ndarray, n_neighbors: int, metric: str = "cosine") -> sp.csr_matrix:
    """Gaussian connectivities beyond the k-th neighbour (``knn=False``), self loops included."""
    n = x.shape[0]
    k = n_neighbors - 1
    n_candidates = n - 1 if n <= DENSE_LIMIT else min(n - 1, SOFT_FACTOR * n_neighbors)
    indices, distances = nearest_neighbors(x, n_candidates, metric)
    d2 = distances**2
    s2 = d2[:, min(k, n_candidates) - 1] / 4.0
    rows = np.concatenate([np.arange(n), np.repeat(np.arange(n), n_candidates)])
    cols = np.concatenate([np.arange(n), indices.ravel()])
    w = np.concatenate([np.where(s2 > 0, 1.0, 0.0), _pair_weights(d2.ravel(), s2[rows[n:]], s2[cols[n:]])])
    keep = w > MIN_WEIGHT
    graph = sp.csr_matrix((w[keep], (rows[keep], cols[keep])), shape=(n, n))
    return graph.maximum(graph.T).tocsr()


def _smooth_knn(distances: np.ndarray, n_neighbors: int, n_iter: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """UMAP's ``smooth_knn_dist`` (``local_connectivity=1``), vectorised over cells.

    ``distances`` are to the other neighbours (self excluded), nearest first."""
    target = np.log2(n_neighbors)
    positive = distances > 0
    rho = np.where(positive.any(axis=1), distances[np.arange(distances.shape[0]), positive.argmax(axis=1)], 0.0)
    lo = np.zeros(distances.shape[0])
    hi = np.full(distances.shape[0], np.inf)
    mid = np.ones(distances.shape[0])
    excess = np.maximum(distances - rho[:, None], 0.0)
    for _ in range(n_iter):
        psum = np.exp(-excess / mid[:, None]).sum(axis=1)
        over = psum > target
        hi = np.where(over, mid, hi)
        lo = np.where(over, lo, mid)
        mid = np.where(over, (lo + hi) / 2.0, np.where(np.isinf(hi), mid * 2.0, (lo + hi) / 2.0))
    mean_all = distances.mean()
    floor = 1e-3 * np.where(rho > 0, distances.mean(axis=1), mean_all)
    return np.maximum(mid, floor), rho


def umap_connectivities(indices: np.ndarray, distances: np.ndarray, n_neighbors: int) -> sp.csr_matrix:
    """UMAP's fuzzy simplicial set of a kNN graph (``n_neighbors`` counts the cell)."""
    n, k = indices.shape
    sigma, rho = _smooth_knn(distances, n_neighbors)
    w = np.exp(-np.maximum(distances - rho[:, None], 0.0) / sigma[:, None])
    graph = sp.csr_matrix((w.ravel(), (np.repeat(np.arange(n), k), indices.ravel())), shape=(n, n))
    product = graph.multiply(graph.T)
    return (graph + graph.T - product).tocsr()


def _finish(graph: sp.csr_matrix) -> sp.csr_matrix:
    graph.sum_duplicates()
    graph.sort_indices()
    return graph.astype(np.float32)


def build_graph(x: np.ndarray, config: GraphConfig) -> sp.csr_matrix:
    """The symmetric weighted cell graph of the rows of ``x`` (CSR, float32)."""
    check_neighbors(x.shape[0], config.n_neighbors)
    if config.connectivity == "gauss" and not config.knn:
        return _finish(gauss_soft(x, config.n_neighbors, config.metric))
    indices, distances = nearest_neighbors(x, config.n_neighbors - 1, config.metric)
    if config.connectivity == "gauss":
        return _finish(gauss_knn(indices, distances))
    return _finish(umap_connectivities(indices, distances, config.n_neighbors))


def build_graphs(x: np.ndarray, config: GraphConfig) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """The cell graph of the rows of ``x`` (:func:`build_graph`), and the graph the
    standard Leiden pipeline clusters: UMAP connectivities of the same kNN search."""
    if config.connectivity == "umap" or not config.knn:
        graph = build_graph(x, config)
        if config.connectivity == "umap":
            return graph, graph
        indices, distances = nearest_neighbors(x, config.n_neighbors - 1, config.metric)
        return graph, _finish(umap_connectivities(indices, distances, config.n_neighbors))
    check_neighbors(x.shape[0], config.n_neighbors)
    indices, distances = nearest_neighbors(x, config.n_neighbors - 1, config.metric)
    return _finish(gauss_knn(indices, distances)), _finish(umap_connectivities(indices, distances, config.n_neighbors))


def gcn_adjacency(graph: sp.csr_matrix, mode: str) -> sp.csr_matrix:
    """The adjacency the GCN propagates over.

    ``raw`` (published): the connectivities as they are. ``normalized`` (Kipf & Welling):
    ``D^-1/2 (A + I) D^-1/2`` with the diagonal of ``A`` set to 1, so that a cell's
    aggregate is a weighted average whatever its number of neighbours (raw row sums of
    15–70 saturate the GCN's tanh)."""
    if mode == "raw":
        return graph
    looped = graph.tolil()
    looped.setdiag(1.0)
    looped = looped.tocsr()
    inv_sqrt = 1.0 / np.sqrt(np.asarray(looped.sum(axis=1), dtype=np.float64).ravel())
    out = (sp.diags(inv_sqrt) @ looped @ sp.diags(inv_sqrt)).tocsr()
    out.sort_indices()
    return out.astype(np.float32)


def leiden(graph: sp.csr_matrix, resolution: float, seed: int) -> np.ndarray:
    """Leiden (``leidenalg``, RB configuration model) on a weighted graph; labels 0.. by size."""
    import igraph
    import leidenalg

    upper = sp.triu(graph, k=1).tocoo()
    g = igraph.Graph(n=graph.shape[0], edges=np.column_stack([upper.row, upper.col]).tolist(), directed=False)
    partition = leidenalg.find_partition(
        g,
        leidenalg.RBConfigurationVertexPartition,
        weights=upper.data.astype(np.float64).tolist(),
        resolution_parameter=resolution,
        n_iterations=-1,
        seed=seed,
    )
    return relabel_by_size(np.asarray(partition.membership, dtype=np.int64))


def relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters 0, 1, … from the largest (ties: first seen)."""
    uniq, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))
    new = np.empty(uniq.size, dtype=np.int64)
    new[order] = np.arange(uniq.size)
    return new[np.searchsorted(uniq, labels)]
