"""Batches of cells for training: their graph rows as torch tensors, renumbered.

A batch's GCN reads its cells' rows of the adjacency; the columns are the batch cells
first, then the other cells those rows reference (graph neighbours, sampled non-edges),
whose features come from the trainer's caches. The graph decoder scores every pair of
the batch rows × all cells while that is at most :attr:`TrainConfig.exhaustive_pairs`
pairs (a dense block of the graph), else the rows' edges plus a uniform sample of
non-edges (:class:`losses.GraphPairs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from hitanno_cli.clustering import losses
from hitanno_cli.clustering.config import TrainConfig

#: A batch's adjacency is used dense when at least this share of its entries is non-zero.
DENSE_ADJ_FILL = 0.05


def torch_sparse(matrix: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    """A scipy matrix as a coalesced float32 torch COO tensor on ``device``."""
    coo = matrix.tocoo()
    index = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    values = torch.from_numpy(coo.data.astype(np.float32))
    return torch.sparse_coo_tensor(index, values, coo.shape, device=device, check_invariants=False).coalesce()


@dataclass
class GraphBatch:
    """One batch of cells with its graph rows in the batch's column numbering."""

    idx: np.ndarray  # the batch cells
    outside: np.ndarray  # other cells referenced (graph neighbours, non-edges)
    adj: torch.Tensor  # [batch, batch + outside], sparse unless dense enough
    pairs: losses.GraphPairs | None  # sampled non-edges: the sparse graph loss
    block: torch.Tensor | None  # or, with every column present, the dense target block


def make_batch(
    adjacency: sp.csr_matrix,
    graph: sp.csr_matrix,
    idx: np.ndarray,
    *,
    cfg: TrainConfig,
    rng: np.random.Generator,
    device: torch.device,
) -> GraphBatch:
    """Rows of the batch ``idx``: of the GCN's ``adjacency`` and of the ``graph`` the graph
    decoder reconstructs (the connectivities; same pattern but for the diagonal).

    While ``batch × cells`` is at most ``cfg.exhaustive_pairs`` every pair is scored (a
    dense block of the graph, the published loss restricted to the batch rows); beyond,
    the batch rows' edges plus ``cfg.non_edges_per_cell`` sampled non-edges."""
    n = graph.shape[0]
    rows, adj_rows = graph[idx].tocsr(), adjacency[idx].tocoo()
    position = np.full(n, -1, dtype=np.int64)
    position[idx] = np.arange(idx.size)
    exhaustive = idx.size * n <= cfg.exhaustive_pairs
    if exhaustive:
        referenced = np.arange(n)
    else:
        non_r, non_c, non_scale = losses.sample_non_edges(rows, cfg.non_edges_per_cell, rng)
        referenced = np.unique(np.concatenate([adj_rows.col, rows.indices, non_c]))
    outside = referenced[position[referenced] < 0]
    position[outside] = idx.size + np.arange(outside.size)
    n_cols = idx.size + outside.size
    adj = _tensor_block(adj_rows, position, n_cols, dense=exhaustive, device=device)
    coo = rows.tocoo()
    if exhaustive:
        block = adj if adjacency is graph else _tensor_block(coo, position, n_cols, dense=True, device=device)
        return GraphBatch(idx, outside, adj, None, block)
    pairs = losses.GraphPairs(
        edge_rows=coo.row,
        edge_cols=position[coo.col],
        edge_weight=coo.data,
        non_rows=non_r,
        non_cols=position[non_c],
        non_scale=non_scale,
        n_total=n,
        device=device,
    )
    return GraphBatch(idx, outside, adj, pairs, None)


def _tensor_block(
    coo: sp.coo_matrix, position: np.ndarray, n_cols: int, *, dense: bool, device: torch.device
) -> torch.Tensor:
    """Graph rows as a torch tensor with columns renumbered by ``position``; dense when
    asked or when at least :data:`DENSE_ADJ_FILL` of its entries are non-zero."""
    cols = position[coo.col]
    if dense or coo.nnz >= DENSE_ADJ_FILL * coo.shape[0] * n_cols:
        block = np.zeros((coo.shape[0], n_cols), dtype=np.float32)
        block[coo.row, cols] = coo.data
        return torch.from_numpy(block).to(device)
    return torch.sparse_coo_tensor(
        torch.from_numpy(np.vstack([coo.row, cols]).astype(np.int64)),
        torch.from_numpy(coo.data.astype(np.float32)),
        (coo.shape[0], n_cols),
        device=device,
        check_invariants=False,
    ).coalesce()
