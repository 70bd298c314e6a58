"""Losses of AttentionAE-sc, as published: ZINB / Bernoulli reconstruction, the graph
decoder's reconstruction of the cell graph, and DEC's Student-t clustering loss."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F


# -- reconstruction -------------------------------------------------------------------------
def zinb_nll(x: torch.Tensor, mean: torch.Tensor, disp: torch.Tensor, pi_logit: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of counts ``x`` under ZINB(mean, dispersion θ, π).

    ``NB(x; μ, θ) = Γ(x+θ) / (Γ(θ) x!) · (θ/(θ+μ))^θ · (μ/(θ+μ))^x``;
    ``P(0) = π + (1-π) NB(0)``, ``P(x>0) = (1-π) NB(x)``. The dropout probability comes as
    a logit, so ``log π`` and ``log(1-π)`` are exact where a sigmoid would saturate.

    Every entry needs ``log NB(0) = θ (log θ − log(θ+μ))``; the rest of ``log NB(x)`` (the
    gamma functions, and their digammas in the gradient) only where ``x > 0``, so it is
    computed on those entries alone: most of a count matrix is zeros.
    """
    log_pi = -F.softplus(-pi_logit)
    log_one_minus_pi = -F.softplus(pi_logit)
    log_theta_mu = torch.log(disp + mean)
    zero_nb = disp * (torch.log(disp) - log_theta_mu)
    zero = x == 0
    per_entry = torch.where(zero, torch.logaddexp(log_pi, log_one_minus_pi + zero_nb), log_one_minus_pi + zero_nb)
    nonzero = (~zero).flatten().nonzero().squeeze(1)
    x_nz, disp_nz = x.flatten()[nonzero], disp.flatten()[nonzero]
    nonzero_rest = (
        torch.lgamma(x_nz + disp_nz)
        - torch.lgamma(disp_nz)
        - torch.lgamma(x_nz + 1.0)
        + x_nz * (torch.log(mean.flatten()[nonzero]) - log_theta_mu.flatten()[nonzero])
    )
    return -(per_entry.sum() + nonzero_rest.sum()) / x.numel()


def bernoulli_nll(x: torch.Tensor, logit: torch.Tensor, size_factor: torch.Tensor) -> torch.Tensor:
    """Mean Bernoulli negative log-likelihood of binary accessibility ``x``; the cell's
    depth enters as a logit offset ``log(size factor)``."""
    return F.binary_cross_entropy_with_logits(logit + torch.log(size_factor), x)


def reconstruction_loss(x: torch.Tensor, recon, size_factor: torch.Tensor) -> torch.Tensor:
    """ZINB with mean × size factor (scRNA-seq), or Bernoulli (scATAC-seq)."""
    if recon.logit is not None:
        return bernoulli_nll(x, recon.logit, size_factor)
    return zinb_nll(x, recon.mean * size_factor, recon.disp, recon.pi_logit)


# -- graph decoder ----------------------------------------------------------------------------
def graph_loss_dense(h: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
    """The published graph loss: ``mean((sigmoid(H Hᵀ) - A)²)`` over all N² pairs."""
    return F.mse_loss(torch.sigmoid(h @ h.T), adj)


def graph_loss_block(h_rows: torch.Tensor, h_cols: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The published loss over every pair of the batch rows × all cells (``target`` is
    the dense block of the adjacency, columns in the order of ``h_cols``)."""
    return F.mse_loss(torch.sigmoid(h_rows @ h_cols.T), target)


def graph_loss_sparse(h_rows: torch.Tensor, h_cols: torch.Tensor, pairs: GraphPairs) -> torch.Tensor:
    """The same loss from the graph's edges plus non-edges.

    Rows are batch cells, columns any cells (features ``h_cols``); ``pairs`` lists the
    batch rows' edges with their weights and a set of non-edges, each with the weight
    that makes their sum stand for all the row's non-edges. The result is an unbiased
    estimate of :func:`graph_loss_dense` (exactly it when the batch is every cell and
    the non-edges are all listed).
    """
    edge = (h_rows[pairs.edge_rows] * h_cols[pairs.edge_cols]).sum(-1)
    non = (h_rows[pairs.non_rows] * h_cols[pairs.non_cols]).sum(-1)
    total = ((torch.sigmoid(edge) - pairs.edge_weight) ** 2).sum()
    total = total + (pairs.non_scale * torch.sigmoid(non) ** 2).sum()
    return total / (h_rows.shape[0] * pairs.n_total)


class GraphPairs:
    """Edges and non-edges of a batch's rows, in the batch's column numbering (tensors)."""

    def __init__(
        self,
        *,
        edge_rows: np.ndarray,
        edge_cols: np.ndarray,
        edge_weight: np.ndarray,
        non_rows: np.ndarray,
        non_cols: np.ndarray,
        non_scale: np.ndarray,
        n_total: int,
        device: torch.device | str = "cpu",
    ) -> None:
        def t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)

        self.edge_rows, self.edge_cols = t(edge_rows, torch.long), t(edge_cols, torch.long)
        self.edge_weight = t(edge_weight, torch.float32)
        self.non_rows, self.non_cols = t(non_rows, torch.long), t(non_cols, torch.long)
        self.non_scale = t(non_scale, torch.float32)
        self.n_total = n_total


def all_non_edges(rows: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Every ``(row, column)`` with no edge, for graph rows ``rows`` (all columns)."""
    n_rows, n_cols = rows.shape
    dense = np.ones((n_rows, n_cols), dtype=bool)
    dense[np.repeat(np.arange(n_rows), np.diff(rows.indptr)), rows.indices] = False
    r, c = np.nonzero(dense)
    return r, c


def sample_non_edges(
    rows: sp.csr_matrix, per_row: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``per_row`` uniform draws of columns per row, edges rejected; returns rows, columns
    and the weight ``(n_cols - degree) / kept draws`` of each kept draw."""
    n_rows, n_cols = rows.shape
    r = np.repeat(np.arange(n_rows), per_row)
    c = rng.integers(0, n_cols, size=r.size)
    edge_keys = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(rows.indptr)) * n_cols + rows.indices
    is_edge = np.isin(r.astype(np.int64) * n_cols + c, edge_keys)
    r, c = r[~is_edge], c[~is_edge]
    kept = np.bincount(r, minlength=n_rows)
    degree = np.diff(rows.indptr)
    scale = (n_cols - degree[r]) / kept[r]
    return r, c, scale.astype(np.float32)


# -- clustering ---------------------------------------------------------------------------------
def soft_assign(z: torch.Tensor, centroids: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """DEC's Student-t soft assignment ``q_ij ∝ (1 + |z_i - μ_j|² / α)^(-(α+1)/2)``."""
    d2 = torch.cdist(z, centroids) ** 2
    q = (1.0 + d2 / alpha) ** (-(alpha + 1.0) / 2.0)
    return q / q.sum(dim=1, keepdim=True)


def target_distribution(q: torch.Tensor) -> torch.Tensor:
    """DEC's sharpened target ``p_ij ∝ q_ij² / Σ_i q_ij`` (rows sum to 1)."""
    weight = q**2 / q.sum(dim=0)
    return weight / weight.sum(dim=1, keepdim=True)


def kl_loss(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q)`` averaged over cells, ``p`` a fixed target."""
    return F.kl_div(torch.log(q), p, reduction="batchmean")
