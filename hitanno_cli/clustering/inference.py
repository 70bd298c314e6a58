"""Embedding and assigning cells with a trained model, in evaluation mode and in chunks.

The GCN runs over the whole sparse graph and the cross-cell attention over a fixed key
set: all cells up to ``batch_size`` cells, else a seeded uniform sample of
``batch_size`` cells. Memory grows with cells × 256, never cells².
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from hitanno_cli.clustering import losses
from hitanno_cli.clustering.batching import torch_sparse
from hitanno_cli.clustering.graph import GraphConfig, build_graph, gcn_adjacency
from hitanno_cli.clustering.model import AttentionAE
from hitanno_cli.clustering.preprocess import Features, Prepared, pca

#: Above this many cells the published kNN search runs on PCA-50 of the features.
PCA_ABOVE = 10_000
N_PCS = 50
#: Cells per chunk at inference.
INFER_CHUNK = 4096


def graph_input(features: Features, config: GraphConfig, seed: int) -> np.ndarray:
    """What the kNN search runs on: PCA of the z-scored features (``config.n_pcs``
    components), or, with ``n_pcs`` 0 as published, the features themselves up to
    :data:`PCA_ABOVE` cells and their PCA-50 above."""
    n_pcs = config.n_pcs or (N_PCS if features.n_cells > PCA_ABOVE else 0)
    if n_pcs and features.n_features > n_pcs:
        return pca(features, n_pcs, seed)
    return features.rows(slice(None))


def key_index(n: int, n_keys: int, seed: int) -> np.ndarray:
    """Cells whose features are the attention keys at inference: all, or a seeded sample."""
    if n <= n_keys:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=n_keys, replace=False))


@torch.no_grad()
def embed(
    model: AttentionAE,
    features: Features,
    adj: torch.Tensor,
    keys: np.ndarray,
    *,
    device: torch.device,
    chunk: int = INFER_CHUNK,
    keep_features: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Latent codes of all cells in evaluation mode (no noise, no dropout), in chunks.

    With ``keys`` all cells this equals ``model(x, adj).z`` on the whole data set. With
    ``keep_features`` returns ``(z, (e1, h1, h2))``, the encoder and GCN features too."""
    was_training = model.training
    model.eval()
    n = features.n_cells
    spans = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    e1 = torch.cat([model.encode_1(torch.from_numpy(features.rows(slice(lo, hi))).to(device)) for lo, hi in spans])
    h1 = model.gnn_1(adj, e1)
    h2 = model.gnn_2(adj, h1)
    enc_h2 = model.encode_2(e1)
    kept = (e1, h1, h2) if keep_features else None
    del e1
    key_t = torch.from_numpy(keys).to(device)
    k1, v1 = model.attn1.project_kv(enc_h2[key_t])
    enc_h2 = torch.cat([model.attn1.attend(k1, v1, h1[lo:hi]) + enc_h2[lo:hi] for lo, hi in spans])
    z0 = model.to_z(enc_h2)
    k2, v2 = model.attn2.project_kv(z0[key_t])
    z = torch.cat([model.attn2.attend(k2, v2, h2[lo:hi]) + z0[lo:hi] for lo, hi in spans])
    model.train(was_training)
    return (z, kept) if keep_features else z


@torch.no_grad()
def assign(z: torch.Tensor, centroids: torch.Tensor) -> np.ndarray:
    """Each cell's cluster: the highest Student-t soft assignment (the nearest centroid)."""
    return losses.soft_assign(z, centroids).argmax(dim=1).cpu().numpy()


def dissolve_small(z: np.ndarray, labels: np.ndarray, centroids: np.ndarray, min_size: int) -> np.ndarray:
    """Labels with every final cluster under ``min_size`` cells dissolved: its cells go to
    their nearest remaining centroid (the largest cluster always remains).

    Self-training can leave a centroid that holds a handful of cells, which reads as a
    population of its own; like the start's small clusters (:func:`.partition.merge_small`)
    it is noise. Assigning ``z`` to the remaining centroids gives the returned labels, so a
    saved model without the dissolved centroids reproduces them."""
    sizes = np.bincount(labels, minlength=centroids.shape[0])
    keep = sizes >= min_size
    keep[int(np.argmax(sizes))] = True
    if not np.any((sizes > 0) & ~keep):
        return labels
    kept = np.flatnonzero(keep)
    z_t, c_t = torch.from_numpy(np.ascontiguousarray(z)), torch.from_numpy(np.ascontiguousarray(centroids[kept]))
    return kept[assign(z_t, c_t)]


def embed_and_assign(
    model: AttentionAE,
    centroids: np.ndarray,
    data: Prepared,
    *,
    graph_config: GraphConfig,
    batch_size: int,
    seed: int,
    device: torch.device,
    graph: sp.csr_matrix | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Latent codes and clusters of every kept cell (builds their graph unless given).

    ``batch_size`` and ``seed`` choose the attention keys as training did."""
    if graph is None:
        graph = build_graph(graph_input(data.features, graph_config, seed), graph_config)
    adjacency = torch_sparse(gcn_adjacency(graph, model.config.adjacency), device)
    model = model.to(device)
    z = embed(model, data.features, adjacency, key_index(data.n_cells, batch_size, seed), device=device)
    labels = assign(z, torch.from_numpy(centroids).to(device))
    return z.cpu().numpy(), labels
