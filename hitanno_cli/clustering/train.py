"""Training AttentionAE (SPEC §2.4–2.6) in batches of cells, and embedding/assigning cells.

**Batches.** The published code runs every epoch on all cells at once with dense N×N
matrices. Here an epoch is a pass over the cells in random batches of ``batch_size``;
with the batch holding every cell (the default up to 4096 cells) a step is exactly the
published full-batch step. Otherwise:

* the GCN of a batch reads its cells' graph rows (sparse); neighbours outside the batch
  contribute their features from a cache of every cell's encoder (``e1``) and GCN
  (``h1``, ``h2``) features, refreshed from the current model at the start of every epoch
  and overwritten by each batch's fresh values (historical embeddings);
* the graph decoder is trained on the batch rows' edges plus non-edges (all of them
  while ``batch × cells`` is at most :attr:`TrainConfig.exhaustive_pairs`, else a
  uniform sample, weighted so that the loss stays an unbiased estimate of the published
  mean over all N² pairs);
* the cross-cell attention's keys and values are the batch cells (a uniform sample of
  all cells), so its cost is ``batch²``, never ``N²``.

**Inference** (:func:`embed`) runs in evaluation mode over all cells in chunks: the GCN
over the whole sparse graph and the attention over a fixed key set (all cells up to
``batch_size`` cells, else a seeded uniform sample of ``batch_size`` cells).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from hitanno_cli import console
from hitanno_cli.clustering import losses
from hitanno_cli.clustering.graph import GraphConfig, build_graph, gcn_adjacency, leiden
from hitanno_cli.clustering.model import AttentionAE, ModelConfig
from hitanno_cli.clustering.preprocess import Features, Prepared, pca

#: Above this many cells the kNN search runs on PCA-50 of the features (SPEC §2.2).
PCA_ABOVE = 10_000
N_PCS = 50
#: Cells per chunk at inference.
INFER_CHUNK = 4096


@dataclass(frozen=True)
class TrainConfig:
    """Published defaults of both training phases (SPEC §2.4–2.5)."""

    pretrain_epochs: int = 200
    cluster_epochs: int = 100
    lr: float = 1e-3
    batch_size: int = 4096
    graph_weight: float = 0.1  # pre-training: ZINB + 0.1 × graph
    cluster_recon_weight: float = 0.1  # clustering: KL + 0.1 × ZINB + 0.01 × graph
    cluster_graph_weight: float = 0.01
    grad_clip: float = 3.0
    lr_step: int = 40  # pre-training lr halves every 40 epochs
    lr_gamma: float = 0.5
    tol: float = 1e-3  # stop clustering when < 0.1 % of labels change ...
    min_cluster_epochs: int = 20  # ... after epoch 20
    resolution: float = 1.0
    non_edges_per_cell: int = 64
    exhaustive_pairs: int = 1 << 22
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class History:
    """What training did, for ``metrics.json``."""

    pretrain_loss: list[float] = field(default_factory=list)
    pretrain_recon: list[float] = field(default_factory=list)
    pretrain_graph: list[float] = field(default_factory=list)
    cluster_loss: list[float] = field(default_factory=list)
    cluster_delta: list[float] = field(default_factory=list)
    n_init_clusters: int = 0
    stopped_epoch: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        last = (lambda xs: round(xs[-1], 5) if xs else None)
        return {
            "pretrain_epochs_run": len(self.pretrain_loss),
            "pretrain_final_loss": last(self.pretrain_loss),
            "pretrain_final_recon": last(self.pretrain_recon),
            "pretrain_final_graph": last(self.pretrain_graph),
            "cluster_epochs_run": len(self.cluster_loss),
            "cluster_final_loss": last(self.cluster_loss),
            "cluster_stopped_by_tolerance_at_epoch": self.stopped_epoch,
            "n_leiden_init_clusters": self.n_init_clusters,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; refuse CUDA when there is none."""
    from hitanno_cli.errors import UserError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but torch sees no CUDA GPU", "pass --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}' is not a torch device", "pass auto, cpu or cuda") from None


def graph_input(features: Features, config: GraphConfig, seed: int) -> np.ndarray:
    """What the kNN search runs on: PCA of the z-scored features (``config.n_pcs``
    components), or, with ``n_pcs`` 0 as published, the features themselves up to
    :data:`PCA_ABOVE` cells and their PCA-50 above."""
    n_pcs = config.n_pcs or (N_PCS if features.n_cells > PCA_ABOVE else 0)
    if n_pcs and features.n_features > n_pcs:
        return pca(features, n_pcs, seed)
    return features.rows(slice(None))


def torch_sparse(matrix: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    coo = matrix.tocoo()
    index = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    values = torch.from_numpy(coo.data.astype(np.float32))
    return torch.sparse_coo_tensor(index, values, coo.shape, device=device, check_invariants=False).coalesce()


#: A batch's adjacency is used dense when at least this share of its entries is non-zero.
DENSE_ADJ_FILL = 0.05


@dataclass
class Batch:
    """One batch of cells with its graph rows in the batch's column numbering."""

    idx: np.ndarray  # the batch cells
    outside: np.ndarray  # other cells referenced (graph neighbours, non-edges)
    adj: torch.Tensor  # [batch, batch + outside], sparse unless dense enough
    pairs: losses.GraphPairs | None  # sampled non-edges: the sparse graph loss
    block: torch.Tensor | None  # or, with every column present, the dense target block


def make_batch(adjacency: sp.csr_matrix, graph: sp.csr_matrix, idx: np.ndarray, cfg: TrainConfig,
               rng: np.random.Generator, device: torch.device) -> Batch:
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
        block = adj if adjacency is graph else _tensor_block(coo, position, n_cols, True, device)
        return Batch(idx, outside, adj, None, block)
    pairs = losses.GraphPairs(coo.row, position[coo.col], coo.data, non_r, position[non_c], non_scale, n, device)
    return Batch(idx, outside, adj, pairs, None)


def _tensor_block(coo: sp.coo_matrix, position: np.ndarray, n_cols: int, dense: bool,
                  device: torch.device) -> torch.Tensor:
    """Graph rows as a torch tensor with columns renumbered by ``position``; dense when
    asked or when at least :data:`DENSE_ADJ_FILL` of its entries are non-zero."""
    cols = position[coo.col]
    if dense or coo.nnz >= DENSE_ADJ_FILL * coo.shape[0] * n_cols:
        block = np.zeros((coo.shape[0], n_cols), dtype=np.float32)
        block[coo.row, cols] = coo.data
        return torch.from_numpy(block).to(device)
    return torch.sparse_coo_tensor(
        torch.from_numpy(np.vstack([coo.row, cols]).astype(np.int64)),
        torch.from_numpy(coo.data.astype(np.float32)), (coo.shape[0], n_cols), device=device,
        check_invariants=False,
    ).coalesce()


class Trainer:
    """Pre-training, Leiden initialisation and DEC self-training of one model on one data set."""

    def __init__(self, model: AttentionAE, data: Prepared, graph: sp.csr_matrix, graph_config: GraphConfig,
                 cfg: TrainConfig, device: torch.device) -> None:
        self.model = model.to(device)
        self.data, self.graph, self.graph_config, self.cfg, self.device = data, graph, graph_config, cfg, device
        self.adjacency = gcn_adjacency(graph, model.config.adjacency)
        self.n = data.n_cells
        self.batch_size = max(2, min(cfg.batch_size, self.n))
        self.full_batch = self.batch_size >= self.n
        self.rng = np.random.default_rng(cfg.seed)
        self.adj = torch_sparse(self.adjacency, device)
        self.key_index = key_index(self.n, self.batch_size, cfg.seed)
        self.history = History()
        self.centroids: torch.Tensor | None = None
        self._x_all: torch.Tensor | None = None
        self._t_all: torch.Tensor | None = None
        width = model.config
        self.e1 = torch.zeros(0 if self.full_batch else self.n, width.n_enc_1, device=device)
        self.h1 = torch.zeros(0 if self.full_batch else self.n, width.n_enc_2, device=device)
        self.h2 = torch.zeros(0 if self.full_batch else self.n, width.n_z, device=device)

    # -- data ---------------------------------------------------------------------------------
    def _inputs(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.full_batch:  # the same tensors every epoch: build them once
            if self._x_all is None:
                self._x_all = torch.from_numpy(self.data.features.rows(idx)).to(self.device)
                self._t_all = torch.from_numpy(self.data.target[idx].toarray().astype(np.float32)).to(self.device)
            x, target = self._x_all, self._t_all
        else:
            x = torch.from_numpy(self.data.features.rows(idx)).to(self.device)
            target = torch.from_numpy(self.data.target[idx].toarray().astype(np.float32)).to(self.device)
        sf = torch.from_numpy(self.data.size_factors[idx][:, None]).to(self.device)
        return x, target, sf

    def _batches(self) -> list[np.ndarray]:
        if self.full_batch:
            return [np.arange(self.n)]
        n_batches = math.ceil(self.n / self.batch_size)
        return [np.sort(b) for b in np.array_split(self.rng.permutation(self.n), n_batches)]

    # -- caches of out-of-batch features ---------------------------------------------------------
    @torch.no_grad()
    def _warm_batchnorm(self) -> None:
        """Running BatchNorm statistics from the untrained model (evaluation mode needs them)."""
        model = self.model
        bns = (model.BN_1, model.BN_2)
        saved = [bn.momentum for bn in bns]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average over this pass
        model.train()
        for idx in self._batches():
            x = torch.from_numpy(self.data.features.rows(idx)).to(self.device)
            model.encode_2(model.encode_1(x))
        for bn, momentum in zip(bns, saved):
            bn.momentum = momentum

    @torch.no_grad()
    def _refresh_caches(self) -> None:
        if self.full_batch:
            return
        model = self.model
        was_training = model.training
        model.eval()
        for lo in range(0, self.n, INFER_CHUNK):
            hi = min(lo + INFER_CHUNK, self.n)
            self.e1[lo:hi] = model.encode_1(torch.from_numpy(self.data.features.rows(slice(lo, hi))).to(self.device))
        self.h1 = model.gnn_1(self.adj, self.e1)
        self.h2 = model.gnn_2(self.adj, self.h1)
        model.train(was_training)

    def _forward(self, batch: Batch, x: torch.Tensor):
        if self.full_batch:
            return self.model(x, batch.adj)
        out_idx = torch.from_numpy(batch.outside).to(self.device)
        return self.model(x, batch.adj, self.e1[out_idx], self.h1[out_idx])

    def _graph_loss(self, batch: Batch, h2: torch.Tensor) -> torch.Tensor:
        if self.full_batch or batch.outside.size == 0:
            cols = h2
        else:
            cols = torch.cat([h2, self.h2[torch.from_numpy(batch.outside).to(self.device)]])
        if batch.block is not None:
            return losses.graph_loss_block(h2, cols, batch.block)
        return losses.graph_loss_sparse(h2, cols, batch.pairs)

    def _update_caches(self, batch: Batch, out) -> None:
        if not self.full_batch:
            idx = torch.from_numpy(batch.idx).to(self.device)
            self.e1[idx], self.h1[idx], self.h2[idx] = out.e1.detach(), out.h1.detach(), out.h2.detach()

    def _step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], loss: torch.Tensor) -> None:
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm=self.cfg.grad_clip, norm_type=2)
        optimizer.step()

    # -- phase 1 --------------------------------------------------------------------------------
    def pretrain(self) -> None:
        """ZINB (or Bernoulli) + 0.1 × graph loss; Adam; lr halves every 40 epochs."""
        cfg, model = self.cfg, self.model
        start = time.perf_counter()
        self._warm_batchnorm()
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
        params = list(model.parameters())
        with console.progress("cluster: pre-train", cfg.pretrain_epochs, unit="epochs") as bar:
            for _ in range(cfg.pretrain_epochs):
                self._refresh_caches()
                model.train()
                sums = np.zeros(3)
                for idx in self._batches():
                    batch = make_batch(self.adjacency, self.graph, idx, cfg, self.rng, self.device)
                    x, target, sf = self._inputs(idx)
                    out = self._forward(batch, x)
                    recon = losses.reconstruction_loss(target, out.recon, sf)
                    graph = self._graph_loss(batch, out.h2)
                    loss = recon + cfg.graph_weight * graph
                    self._step(optimizer, params, loss)
                    self._update_caches(batch, out)
                    sums += np.array([loss.item(), recon.item(), graph.item()]) * idx.size / self.n
                scheduler.step()
                self.history.pretrain_loss.append(float(sums[0]))
                self.history.pretrain_recon.append(float(sums[1]))
                self.history.pretrain_graph.append(float(sums[2]))
                bar.advance(1)
                bar.update(description=f"cluster: pre-train (loss {sums[0]:.4f})")
        self.history.seconds["pretrain"] = time.perf_counter() - start

    # -- Leiden initialisation ---------------------------------------------------------------
    def init_clusters(self) -> np.ndarray:
        """Leiden on a graph of the latent codes; the centroids start at cluster means."""
        start = time.perf_counter()
        z = self.embed().cpu().numpy()
        latent_graph = build_graph(z, self.graph_config)
        labels = leiden(latent_graph, self.cfg.resolution, self.cfg.seed)
        n_clusters = int(labels.max()) + 1
        centroids = np.stack([z[labels == c].mean(axis=0) for c in range(n_clusters)])
        self.centroids = torch.nn.Parameter(torch.from_numpy(centroids.astype(np.float32)).to(self.device))
        self.history.n_init_clusters = n_clusters
        self.history.seconds["leiden_init"] = time.perf_counter() - start
        console.info(f"cluster: Leiden (resolution {self.cfg.resolution}) found {n_clusters} initial clusters")
        return labels

    # -- phase 2 --------------------------------------------------------------------------------
    def cluster(self) -> None:
        """DEC self-training: KL(p‖q) + 0.1 × reconstruction + 0.01 × graph, until fewer than
        ``tol`` of the labels change (checked after ``min_cluster_epochs``).

        At the start of every epoch the soft assignments q of all cells are computed in
        evaluation mode (no noise, no dropout), giving the labels the stopping rule
        compares and the sharpened target p the epoch's steps are trained towards."""
        cfg, model = self.cfg, self.model
        if self.centroids is None:
            self.init_clusters()
        start = time.perf_counter()
        params = model.cluster_parameters() + [self.centroids]
        optimizer = torch.optim.Adam(params, lr=cfg.lr)
        last: np.ndarray | None = None
        with console.progress("cluster: self-train", cfg.cluster_epochs, unit="epochs") as bar:
            for epoch in range(cfg.cluster_epochs):
                with torch.no_grad():
                    q_all = losses.soft_assign(self._embed_refreshing_caches(), self.centroids)
                    p_all = losses.target_distribution(q_all)
                labels = q_all.argmax(dim=1).cpu().numpy()
                if last is not None:
                    delta = float(np.mean(labels != last))
                    self.history.cluster_delta.append(delta)
                    if epoch > cfg.min_cluster_epochs and delta < cfg.tol:
                        self.history.stopped_epoch = epoch
                        console.info(f"cluster: {delta:.4%} of labels changed at epoch {epoch}; stopping")
                        break
                last = labels
                model.train()
                total = 0.0
                for idx in self._batches():
                    batch = make_batch(self.adjacency, self.graph, idx, cfg, self.rng, self.device)
                    x, target, sf = self._inputs(idx)
                    out = self._forward(batch, x)
                    q = losses.soft_assign(out.z, self.centroids)
                    p = p_all[torch.from_numpy(idx).to(self.device)]
                    loss = (losses.kl_loss(q, p)
                            + cfg.cluster_recon_weight * losses.reconstruction_loss(target, out.recon, sf)
                            + cfg.cluster_graph_weight * self._graph_loss(batch, out.h2))
                    self._step(optimizer, params, loss)
                    self._update_caches(batch, out)
                    total += loss.item() * idx.size / self.n
                self.history.cluster_loss.append(total)
                bar.advance(1)
        self.history.seconds["cluster"] = time.perf_counter() - start

    # -- inference ------------------------------------------------------------------------------
    def embed(self) -> torch.Tensor:
        return embed(self.model, self.data.features, self.adj, self.key_index, self.device)

    def _embed_refreshing_caches(self) -> torch.Tensor:
        """:meth:`embed`, keeping its encoder and GCN features as the new caches."""
        if self.full_batch:
            return self.embed()
        z, (self.e1, self.h1, self.h2) = embed(self.model, self.data.features, self.adj, self.key_index,
                                               self.device, keep_features=True)
        return z

    def assign(self, z: torch.Tensor) -> np.ndarray:
        return assign(z, self.centroids)


def key_index(n: int, n_keys: int, seed: int) -> np.ndarray:
    """Cells whose features are the attention keys at inference: all, or a seeded sample."""
    if n <= n_keys:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=n_keys, replace=False))


@torch.no_grad()
def embed(model: AttentionAE, features: Features, adj: torch.Tensor, keys: np.ndarray,
          device: torch.device, chunk: int = INFER_CHUNK, keep_features: bool = False):
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


@dataclass
class FitResult:
    """A trained model, its centroids and what happened."""

    model: AttentionAE
    centroids: np.ndarray
    train_index: np.ndarray  # kept cells the model was trained on
    history: History
    init_labels: np.ndarray  # Leiden labels of the training cells


def fit(data: Prepared, graph_config: GraphConfig, cfg: TrainConfig, n_heads: int, device: torch.device,
        max_cells: int, adjacency: str = "normalized") -> tuple[FitResult, Trainer]:
    """Train on all kept cells, or on a seeded uniform sample of ``max_cells`` of them."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if data.n_cells > max_cells:
        train_index = np.sort(rng.choice(data.n_cells, size=max_cells, replace=False))
        console.info(f"cluster: training on a random sample of {max_cells} of {data.n_cells} cells "
                     "(--max-cells); the rest are assigned to the learned centroids")
        train_data = data.subset(train_index)
    else:
        train_index, train_data = np.arange(data.n_cells), data
    start = time.perf_counter()
    graph = build_graph(graph_input(train_data.features, graph_config, cfg.seed), graph_config)
    graph_seconds = time.perf_counter() - start
    console.info(f"cluster: cell graph of {train_data.n_cells} cells, {graph.nnz} edges "
                 f"({graph_config.connectivity}, {'kNN' if graph_config.knn else 'soft'}, "
                 f"{graph_config.n_neighbors} neighbours)")
    config = ModelConfig(n_input=data.features.n_features, n_output=int(data.target.shape[1]),
                         likelihood="zinb" if data.modality == "rna" else "bernoulli", n_heads=n_heads,
                         adjacency=adjacency)
    trainer = Trainer(AttentionAE(config), train_data, graph, graph_config, cfg, device)
    trainer.history.seconds["graph"] = graph_seconds
    trainer.pretrain()
    init_labels = trainer.init_clusters()
    trainer.cluster()
    result = FitResult(trainer.model, trainer.centroids.detach().cpu().numpy(), train_index, trainer.history,
                       init_labels)
    return result, trainer


def embed_and_assign(model: AttentionAE, centroids: np.ndarray, data: Prepared, graph_config: GraphConfig,
                     batch_size: int, seed: int, device: torch.device,
                     graph: sp.csr_matrix | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Latent codes and clusters of every kept cell (builds their graph unless given)."""
    if graph is None:
        graph = build_graph(graph_input(data.features, graph_config, seed), graph_config)
    adjacency = torch_sparse(gcn_adjacency(graph, model.config.adjacency), device)
    model = model.to(device)
    z = embed(model, data.features, adjacency, key_index(data.n_cells, batch_size, seed), device)
    labels = assign(z, torch.from_numpy(centroids).to(device))
    return z.cpu().numpy(), labels

