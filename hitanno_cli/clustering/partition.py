"""The initial partition of the latent codes, from which self-training starts.

One Leiden run at a fixed resolution (``resolution`` a number, as published) gives as
many clusters as that resolution happens to find on this embedding, and self-training
rarely merges them again. ``resolution="auto"`` instead runs Leiden at every resolution
of :data:`RESOLUTIONS` on the latent kNN graph and keeps the partition whose clusters
are best separated in the latent space (highest silhouette; labels are never looked
at), provided that separation is clear
(:data:`CLEAR_SILHOUETTE`). Else the latent space holds no clearly separated clusters,
and the start is the published resolution on the input space's graph (``cell_graph``:
the standard Leiden pipeline's graph, :func:`.graph.build_graphs`), whose answer
self-training then refines (on the latent graph, without a cell graph). Either way, clusters of
fewer than :func:`min_cluster_size` cells are then merged into the cluster with the
nearest centroid: a centroid of three cells only catches noise during self-training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from hitanno_cli.clustering.graph import GraphConfig, build_graph, leiden, relabel_by_size

#: Resolutions tried by ``resolution="auto"``.
RESOLUTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
#: ``auto`` trusts the silhouette only when the best partition reaches it; below, the
#: latent space has no clearly separated clusters, the silhouette then favours the
#: coarsest split, and :data:`FALLBACK_RESOLUTION` is used instead.
CLEAR_SILHOUETTE = 0.5
FALLBACK_RESOLUTION = 1.0
#: The silhouette of a candidate partition is computed on at most this many cells.
SILHOUETTE_CELLS = 4000
#: Clusters smaller than this share of the cells (and at least :data:`MIN_CELLS`) are merged.
MIN_SHARE = 0.005
MIN_CELLS = 5


@dataclass
class Partition:
    """Labels 0.. (by size) of the cells, and how they were chosen (for ``metrics.json``)."""

    labels: np.ndarray
    resolution: float
    n_leiden_clusters: int
    scores: dict[str, float] = field(default_factory=dict)  # resolution → silhouette
    graph: str = "latent"  # the graph Leiden ran on: "latent" or "cells"

    @property
    def n_clusters(self) -> int:
        return int(self.labels.max()) + 1

    def summary(self) -> dict[str, object]:
        return {
            "resolution": self.resolution,
            "n_leiden_clusters": self.n_leiden_clusters,
            "n_clusters": self.n_clusters,
            "graph": self.graph,
            "silhouette_by_resolution": {k: round(v, 4) for k, v in self.scores.items()},
        }


def min_cluster_size(n_cells: int) -> int:
    """Fewest cells an initial cluster keeps: 0.5 % of the cells, at least 5."""
    return max(MIN_CELLS, int(np.ceil(MIN_SHARE * n_cells)))


def centroids_of(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean latent code of every cluster ``0..labels.max()``."""
    n = int(labels.max()) + 1
    sums = np.zeros((n, z.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, z)
    return (sums / np.bincount(labels, minlength=n)[:, None]).astype(np.float32)


def merge_small(z: np.ndarray, labels: np.ndarray, min_size: int) -> np.ndarray:
    """Merge, smallest first, every cluster under ``min_size`` cells into the cluster whose
    centroid is nearest its own; labels renumbered 0.. by size."""
    labels = relabel_by_size(labels)
    while True:
        sizes = np.bincount(labels)
        small = np.flatnonzero(sizes < min_size)
        if small.size == 0 or sizes.size == 1:
            return labels
        victim = small[np.argmin(sizes[small])]
        centroids = centroids_of(z, labels)
        distance = np.linalg.norm(centroids - centroids[victim], axis=1)
        distance[victim] = np.inf
        labels = relabel_by_size(np.where(labels == victim, int(np.argmin(distance)), labels))


def _silhouette(z: np.ndarray, labels: np.ndarray, sample: np.ndarray) -> float:
    from sklearn.metrics import silhouette_score

    if np.unique(labels[sample]).size < 2:
        return -1.0
    return float(silhouette_score(z[sample], labels[sample]))


def initial_partition(
    z: np.ndarray,
    *,
    resolution: float | str,
    graph_config: GraphConfig,
    seed: int,
    merge: bool = True,
    cell_graph: sp.csr_matrix | None = None,
) -> Partition:
    """Leiden on the kNN graph of ``z`` at ``resolution``, or for ``"auto"`` at the best of
    :data:`RESOLUTIONS` by silhouette, falling back to ``cell_graph`` (the latent graph
    without one) at :data:`FALLBACK_RESOLUTION` (see the module docstring); small
    clusters merged unless ``merge`` is False."""
    graph = build_graph(z, graph_config)
    min_size = min_cluster_size(z.shape[0]) if merge else 1
    if resolution != "auto":
        labels = leiden(graph, float(resolution), seed)
        return Partition(merge_small(z, labels, min_size), float(resolution), int(labels.max()) + 1)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(z.shape[0], size=min(z.shape[0], SILHOUETTE_CELLS), replace=False))
    candidates: dict[float, Partition] = {}
    scores: dict[str, float] = {}
    for r in (*RESOLUTIONS, FALLBACK_RESOLUTION):
        if r in candidates:
            continue
        found = leiden(graph, r, seed)
        candidates[r] = Partition(merge_small(z, found, min_size), r, int(found.max()) + 1)
        scores[str(r)] = _silhouette(z, candidates[r].labels, sample)
    best = max(RESOLUTIONS, key=lambda r: (scores[str(r)], -r))
    if scores[str(best)] >= CLEAR_SILHOUETTE:
        chosen = candidates[best]
    elif cell_graph is None:
        chosen = candidates[FALLBACK_RESOLUTION]
    else:
        found = leiden(cell_graph, FALLBACK_RESOLUTION, seed)
        chosen = Partition(merge_small(z, found, min_size), FALLBACK_RESOLUTION, int(found.max()) + 1, graph="cells")
        scores[f"cells {FALLBACK_RESOLUTION}"] = _silhouette(z, chosen.labels, sample)
    chosen.scores = scores
    return chosen
