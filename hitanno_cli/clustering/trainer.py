"""Training AttentionAE-sc in batches of cells: pre-training, Leiden start, DEC self-training.

The published code runs every epoch on all cells at once with dense N×N matrices. Here
an epoch is a pass over the cells in random batches: of ``pretrain_batch_size`` cells
in pre-training (256 by default: many Adam steps per epoch, where one full-batch step
per epoch learns little in the published 200 epochs), of ``batch_size`` in
self-training. With the batch holding every cell (self-training's default up to 4096
cells) a step is exactly the published full-batch step. Otherwise:

* the GCN of a batch reads its cells' graph rows (sparse); neighbours outside the batch
  contribute their features from a cache of every cell's encoder (``e1``) and GCN
  (``h1``, ``h2``) features, refreshed from the current model at the start of every epoch
  and overwritten by each batch's fresh values (historical embeddings);
* the graph decoder is trained on the batch rows' edges plus non-edges
  (:mod:`.batching`), so that the loss stays an unbiased estimate of the published mean
  over all N² pairs;
* the cross-cell attention's keys and values are the batch cells (a uniform sample of
  all cells), so its cost is ``batch²``, never ``N²``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from hitanno_cli import console
from hitanno_cli.clustering import losses
from hitanno_cli.clustering.batching import GraphBatch, make_batch, torch_sparse
from hitanno_cli.clustering.config import History, TrainConfig
from hitanno_cli.clustering.graph import GraphConfig, build_graphs, gcn_adjacency
from hitanno_cli.clustering.inference import INFER_CHUNK, assign, embed, graph_input, key_index
from hitanno_cli.clustering.model import AttentionAE, ModelConfig, Output
from hitanno_cli.clustering.partition import centroids_of, initial_partition, min_cluster_size
from hitanno_cli.clustering.preprocess import Prepared


class Trainer:
    """Pre-training, Leiden initialisation and DEC self-training of one model on one data set."""

    def __init__(
        self,
        model: AttentionAE,
        data: Prepared,
        *,
        graph: sp.csr_matrix,
        graph_config: GraphConfig,
        cfg: TrainConfig,
        device: torch.device,
        start_graph: sp.csr_matrix | None = None,
    ) -> None:
        self.model = model.to(device)
        self.data, self.graph, self.graph_config, self.cfg, self.device = data, graph, graph_config, cfg, device
        # the input-space graph the start falls back to (:func:`.partition.initial_partition`)
        self.start_graph = graph if start_graph is None else start_graph
        self.adjacency = gcn_adjacency(graph, model.config.adjacency)
        self.n = data.n_cells
        self.rng = np.random.default_rng(cfg.seed)
        self.adj = torch_sparse(self.adjacency, device)
        # inference (the start, self-training's targets, assigning) attends to these keys
        self.key_index = key_index(self.n, max(2, min(cfg.batch_size, self.n)), cfg.seed)
        self.history = History()
        self.centroids: torch.Tensor | None = None
        self._x_all: torch.Tensor | None = None
        self._t_all: torch.Tensor | None = None
        width = model.config
        cached = max(2, min(cfg.pretrain_batch_size, cfg.batch_size)) < self.n
        self.e1 = torch.zeros(self.n if cached else 0, width.n_enc_1, device=device)
        self.h1 = torch.zeros(self.n if cached else 0, width.n_enc_2, device=device)
        self.h2 = torch.zeros(self.n if cached else 0, width.n_z, device=device)
        self._use_batches(cfg.batch_size)

    def _use_batches(self, size: int) -> None:
        """Train the coming phase in batches of ``size`` cells (all cells: full batch)."""
        self.batch_size = max(2, min(size, self.n))
        self.full_batch = self.batch_size >= self.n

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

    def _batch(self, idx: np.ndarray) -> GraphBatch:
        return make_batch(self.adjacency, self.graph, idx, cfg=self.cfg, rng=self.rng, device=self.device)

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
        for bn, momentum in zip(bns, saved, strict=True):
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

    def _forward(self, batch: GraphBatch, x: torch.Tensor) -> Output:
        if self.full_batch:
            return self.model(x, batch.adj)
        out_idx = torch.from_numpy(batch.outside).to(self.device)
        return self.model(x, batch.adj, self.e1[out_idx], self.h1[out_idx])

    def _graph_loss(self, batch: GraphBatch, h2: torch.Tensor) -> torch.Tensor:
        if self.full_batch or batch.outside.size == 0:
            cols = h2
        else:
            cols = torch.cat([h2, self.h2[torch.from_numpy(batch.outside).to(self.device)]])
        if batch.block is not None:
            return losses.graph_loss_block(h2, cols, batch.block)
        return losses.graph_loss_sparse(h2, cols, batch.pairs)

    def _update_caches(self, batch: GraphBatch, out: Output) -> None:
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
        self._use_batches(cfg.pretrain_batch_size)
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
                    batch = self._batch(idx)
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
        self._use_batches(cfg.batch_size)
        self.history.seconds["pretrain"] = time.perf_counter() - start

    # -- Leiden initialisation ---------------------------------------------------------------
    def init_clusters(self) -> np.ndarray:
        """Leiden on a graph of the latent codes (:mod:`.partition`); the centroids start
        at the cluster means."""
        start = time.perf_counter()
        z = self.embed().cpu().numpy()
        chosen = initial_partition(
            z,
            resolution=self.cfg.resolution,
            graph_config=self.graph_config,
            seed=self.cfg.seed,
            cell_graph=self.start_graph,
        )
        self.centroids = torch.nn.Parameter(torch.from_numpy(centroids_of(z, chosen.labels)).to(self.device))
        self.history.n_init_clusters = chosen.n_clusters
        self.history.init = chosen.summary()
        self.history.seconds["leiden_init"] = time.perf_counter() - start
        console.info(
            f"cluster: Leiden ({chosen.graph} graph, resolution {chosen.resolution}) "
            f"found {chosen.n_leiden_clusters} clusters; "
            f"{chosen.n_clusters} initial clusters of at least {min_cluster_size(z.shape[0])} cells"
        )
        return chosen.labels

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
                        bar.update(total=epoch, completed=epoch, description="cluster: self-train (converged)")
                        console.info(f"cluster: {delta:.4%} of labels changed at epoch {epoch}; stopping")
                        break
                last = labels
                model.train()
                total = 0.0
                for idx in self._batches():
                    batch = self._batch(idx)
                    x, target, sf = self._inputs(idx)
                    out = self._forward(batch, x)
                    q = losses.soft_assign(out.z, self.centroids)
                    p = p_all[torch.from_numpy(idx).to(self.device)]
                    loss = (
                        losses.kl_loss(q, p)
                        + cfg.cluster_recon_weight * losses.reconstruction_loss(target, out.recon, sf)
                        + cfg.cluster_graph_weight * self._graph_loss(batch, out.h2)
                    )
                    self._step(optimizer, params, loss)
                    self._update_caches(batch, out)
                    total += loss.item() * idx.size / self.n
                self.history.cluster_loss.append(total)
                bar.advance(1)
        self.history.seconds["cluster"] = time.perf_counter() - start

    # -- the trained model on its training cells ---------------------------------------------------
    def embed(self) -> torch.Tensor:
        """Latent codes of the training cells (:func:`.inference.embed`)."""
        return embed(self.model, self.data.features, self.adj, self.key_index, device=self.device)

    def _embed_refreshing_caches(self) -> torch.Tensor:
        """:meth:`embed`, keeping its encoder and GCN features as the new caches."""
        if self.full_batch:
            return self.embed()
        z, (self.e1, self.h1, self.h2) = embed(
            self.model, self.data.features, self.adj, self.key_index, device=self.device, keep_features=True
        )
        return z

    def assign(self, z: torch.Tensor) -> np.ndarray:
        """Clusters of latent codes ``z`` under the current centroids."""
        return assign(z, self.centroids)


@dataclass
class FitResult:
    """A trained model, its centroids and what happened."""

    model: AttentionAE
    centroids: np.ndarray
    train_index: np.ndarray  # kept cells the model was trained on
    history: History
    init_labels: np.ndarray  # Leiden labels of the training cells


def fit(
    data: Prepared,
    *,
    graph_config: GraphConfig,
    train_config: TrainConfig,
    n_heads: int,
    max_cells: int,
    device: torch.device,
    adjacency: str = "normalized",
) -> tuple[FitResult, Trainer]:
    """Train on all kept cells, or on a seeded uniform sample of ``max_cells`` of them."""
    cfg = train_config
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if data.n_cells > max_cells:
        train_index = np.sort(rng.choice(data.n_cells, size=max_cells, replace=False))
        console.info(
            f"cluster: training on a random sample of {max_cells} of {data.n_cells} cells "
            "(--max-cells); the rest are assigned to the learned centroids"
        )
        train_data = data.subset(train_index)
    else:
        train_index, train_data = np.arange(data.n_cells), data
    start = time.perf_counter()
    graph, start_graph = build_graphs(graph_input(train_data.features, graph_config, cfg.seed), graph_config)
    graph_seconds = time.perf_counter() - start
    console.info(
        f"cluster: cell graph of {train_data.n_cells} cells, {graph.nnz} edges "
        f"({graph_config.connectivity}, {'kNN' if graph_config.knn else 'soft'}, "
        f"{graph_config.n_neighbors} neighbours)"
    )
    config = ModelConfig(
        n_input=data.features.n_features,
        n_output=int(data.target.shape[1]),
        likelihood="zinb" if data.modality == "rna" else "bernoulli",
        n_heads=n_heads,
        adjacency=adjacency,
    )
    trainer = Trainer(
        AttentionAE(config),
        train_data,
        graph=graph,
        graph_config=graph_config,
        cfg=cfg,
        device=device,
        start_graph=start_graph,
    )
    trainer.history.seconds["graph"] = graph_seconds
    trainer.pretrain()
    init_labels = trainer.init_clusters()
    trainer.cluster()
    centroids = trainer.centroids.detach().cpu().numpy()
    return FitResult(trainer.model, centroids, train_index, trainer.history, init_labels), trainer
