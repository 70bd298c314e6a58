"""``hitanno cluster`` (AttentionAE-sc): losses, graph, batched training, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import run_cli
from scipy import stats
from scipy.special import expit

from hitanno_cli.clustering import graph as cg
from hitanno_cli.clustering import io, losses
from hitanno_cli.clustering.batching import make_batch, torch_sparse
from hitanno_cli.clustering.config import TrainConfig
from hitanno_cli.clustering.counts import Counts, highly_variable, normalise_log1p, read_counts
from hitanno_cli.clustering.inference import embed, embed_and_assign
from hitanno_cli.clustering.model import AttentionAE, ModelConfig
from hitanno_cli.clustering.preprocess import apply, prepare
from hitanno_cli.clustering.simulate import simulate_counts, write_counts_h5ad
from hitanno_cli.clustering.trainer import Trainer
from hitanno_cli.errors import UserError

FAST = ["--pretrain-epochs", "4", "--cluster-epochs", "3", "-q"]


# -- losses ---------------------------------------------------------------------------------
def test_zinb_nll_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, size=(7, 5)).astype(np.float64)
    x[0, :3] = 0
    mean = rng.uniform(0.1, 5.0, size=x.shape)
    theta = rng.uniform(0.2, 4.0, size=x.shape)
    pi = rng.uniform(0.05, 0.9, size=x.shape)
    nb = stats.nbinom(n=theta, p=theta / (theta + mean))
    direct = np.where(x == 0, -np.log(pi + (1 - pi) * nb.pmf(0)), -np.log(1 - pi) - nb.logpmf(x)).mean()
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    ours = losses.zinb_nll(t(x), t(mean), t(theta), t(np.log(pi / (1 - pi))))
    assert ours.item() == pytest.approx(direct, rel=1e-10)


def test_zinb_nll_gradients_match_the_formula_on_every_entry() -> None:
    """The loss computes the gamma terms on the non-zero counts only; its gradients must be
    those of the textbook formula evaluated on every entry."""
    gen = torch.Generator().manual_seed(3)
    x = torch.poisson(torch.rand(9, 6, generator=gen, dtype=torch.float64) * 2.0)
    x[2] = 0.0
    leaves = [
        (torch.rand(9, 6, generator=gen, dtype=torch.float64) * 4 + 0.1).requires_grad_(),
        (torch.rand(9, 6, generator=gen, dtype=torch.float64) * 3 + 0.2).requires_grad_(),
        torch.randn(9, 6, generator=gen, dtype=torch.float64).requires_grad_(),
    ]

    def formula(mean: torch.Tensor, disp: torch.Tensor, pi_logit: torch.Tensor) -> torch.Tensor:
        pi = torch.sigmoid(pi_logit)
        log_nb = (
            torch.lgamma(x + disp)
            - torch.lgamma(disp)
            - torch.lgamma(x + 1)
            + disp * torch.log(disp / (disp + mean))
            + x * torch.log(mean / (disp + mean))
        )
        zero = torch.log(pi + (1 - pi) * torch.exp(log_nb))
        return -torch.where(x == 0, zero, torch.log(1 - pi) + log_nb).mean()

    ours = torch.autograd.grad(losses.zinb_nll(x, *leaves), leaves)
    direct = torch.autograd.grad(formula(*leaves), leaves)
    for a, b in zip(ours, direct, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_bernoulli_nll_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    x = (rng.uniform(size=(6, 4)) < 0.3).astype(np.float64)
    logit = rng.normal(size=x.shape)
    sf = rng.uniform(0.5, 2.0, size=(6, 1))
    p = expit(logit + np.log(sf))
    direct = -(x * np.log(p) + (1 - x) * np.log(1 - p)).mean()
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    assert losses.bernoulli_nll(t(x), t(logit), t(sf)).item() == pytest.approx(direct, rel=1e-10)


def _random_graph(n: int, seed: int) -> sp.csr_matrix:
    x = np.random.default_rng(seed).normal(size=(n, 6))
    return cg.build_graph(x, cg.GraphConfig(n_neighbors=4, connectivity="gauss", knn=True))


def test_sparse_graph_loss_equals_dense_reference() -> None:
    n = 30
    graph = _random_graph(n, 2)
    h = torch.tensor(np.random.default_rng(3).normal(size=(n, 5)), dtype=torch.float64)
    dense = losses.graph_loss_dense(h, torch.tensor(graph.toarray(), dtype=torch.float64))
    coo = graph.tocoo()
    non_r, non_c = losses.all_non_edges(graph)
    pairs = _pairs(coo, non_r, non_c, np.ones(non_r.size), n)
    pairs.edge_weight, pairs.non_scale = pairs.edge_weight.double(), pairs.non_scale.double()
    assert losses.graph_loss_sparse(h, h, pairs).item() == pytest.approx(dense.item(), rel=1e-12)
    # sampled non-edges: an unbiased estimate of the same number
    rng = np.random.default_rng(4)
    draws = []
    for _ in range(400):
        r, c, scale = losses.sample_non_edges(graph, 8, rng)
        sampled = _pairs(coo, r, c, scale, n)
        draws.append(losses.graph_loss_sparse(h.float(), h.float(), sampled).item())
    assert np.mean(draws) == pytest.approx(dense.item(), rel=0.02)


def _pairs(
    coo: sp.coo_matrix, non_rows: np.ndarray, non_cols: np.ndarray, non_scale: np.ndarray, n: int
) -> losses.GraphPairs:
    return losses.GraphPairs(
        edge_rows=coo.row,
        edge_cols=coo.col,
        edge_weight=coo.data,
        non_rows=non_rows,
        non_cols=non_cols,
        non_scale=non_scale,
        n_total=n,
    )


def test_batched_model_matches_dense_full_batch() -> None:
    """Sparse adjacency = dense adjacency; batch rows with exact caches = full graph rows;
    chunked inference = one full forward."""
    torch.manual_seed(0)
    n = 40
    graph = _random_graph(n, 5)
    model = AttentionAE(ModelConfig(n_input=12, n_output=12, n_heads=2)).eval()
    x = torch.randn(n, 12)
    dense_adj = torch.tensor(graph.toarray())
    full = model(x, dense_adj)
    sparse = model(x, torch_sparse(graph, torch.device("cpu")))
    torch.testing.assert_close(sparse.z, full.z)
    torch.testing.assert_close(sparse.h2, full.h2)
    features = _FixedFeatures(x.numpy())
    z = embed(
        model, features, torch_sparse(graph, torch.device("cpu")), np.arange(n), device=torch.device("cpu"), chunk=16
    )
    torch.testing.assert_close(z, full.z, rtol=1e-5, atol=1e-5)
    # a batch whose out-of-batch neighbours come from (exact) caches
    idx = np.sort(np.random.default_rng(6).choice(n, 15, replace=False))
    cfg = TrainConfig(exhaustive_pairs=0, non_edges_per_cell=5)
    batch = make_batch(graph, graph, idx, cfg=cfg, rng=np.random.default_rng(7), device=torch.device("cpu"))
    out_idx = torch.from_numpy(batch.outside)
    part = model(x[idx], batch.adj, full.e1[out_idx], full.h1[out_idx])
    torch.testing.assert_close(part.h1, full.h1[idx])
    torch.testing.assert_close(part.h2, full.h2[idx])


class _FixedFeatures:
    """Stands in for preprocess.Features with an already z-scored matrix."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x.astype(np.float32)
        self.n_cells, self.n_features = x.shape

    def rows(self, idx):
        return self.x[idx]


# -- graph ----------------------------------------------------------------------------------
def _direct_gauss(x: np.ndarray, n_neighbors: int, knn: bool) -> np.ndarray:
    """The Gaussian kernel written out on dense all-pairs cosine distances."""
    from sklearn.metrics import pairwise_distances

    d = pairwise_distances(x, metric="cosine")
    n = d.shape[0]
    order = np.argsort(d + np.eye(n) * 1e9, axis=1)[:, : n_neighbors - 1]  # other cells, nearest first
    dk2 = np.take_along_axis(d, order, axis=1) ** 2
    s2 = np.median(dk2, axis=1) if knn else dk2[:, -1] / 4
    den = s2[:, None] + s2[None, :]
    w = np.sqrt(2 * np.sqrt(np.outer(s2, s2)) / den) * np.exp(-(d**2) / den)
    if knn:
        mask = np.zeros((n, n), dtype=bool)
        mask[np.repeat(np.arange(n), n_neighbors - 1), order.ravel()] = True
        w = np.where(mask | mask.T, w, 0.0)
    else:
        w[w <= cg.MIN_WEIGHT] = 0.0
    return w


@pytest.mark.parametrize("knn", [True, False])
def test_gauss_connectivities_match_direct_computation(knn: bool) -> None:
    x = np.random.default_rng(8).normal(size=(50, 7))
    ours = cg.build_graph(x, cg.GraphConfig(n_neighbors=6, connectivity="gauss", knn=knn)).toarray()
    np.testing.assert_allclose(ours, _direct_gauss(x, 6, knn), rtol=1e-5, atol=1e-7)


def test_normalized_gcn_adjacency() -> None:
    graph = _random_graph(25, 11)
    a = graph.toarray()
    np.fill_diagonal(a, 1.0)
    d = 1 / np.sqrt(a.sum(axis=1))
    np.testing.assert_allclose(cg.gcn_adjacency(graph, "normalized").toarray(), d[:, None] * a * d[None, :], rtol=1e-6)
    assert cg.gcn_adjacency(graph, "raw") is graph


def test_umap_connectivities_solve_the_membership_equation() -> None:
    x = np.random.default_rng(9).normal(size=(60, 5))
    k = 8
    indices, distances = cg.nearest_neighbors(x, k - 1, "cosine")
    sigma, rho = cg._smooth_knn(distances, k)
    memberships = np.exp(-np.maximum(distances - rho[:, None], 0) / sigma[:, None]).sum(axis=1)
    np.testing.assert_allclose(memberships, np.log2(k), rtol=1e-6)
    graph = cg.umap_connectivities(indices, distances, k).toarray()
    np.testing.assert_allclose(graph, graph.T)
    assert graph.max() <= 1.0 + 1e-12 and np.all(np.diag(graph) == 0)


@pytest.mark.slow  # numba compiles umap-learn's graph step (~5 s)
def test_umap_connectivities_equal_umap_learns_fuzzy_simplicial_set() -> None:
    """The graph the UMAP picture is laid out from is umap-learn's own, given the same neighbours."""
    umap_ = pytest.importorskip("umap.umap_")
    x = np.random.default_rng(3).normal(size=(80, 6)).astype(np.float32)
    k = 10
    indices, distances = cg.nearest_neighbors(x, k - 1, "euclidean")
    ours = cg.umap_connectivities(indices, distances, k).toarray()
    knn_indices = np.hstack([np.arange(80)[:, None], indices])  # umap-learn lists each point first
    knn_dists = np.hstack([np.zeros((80, 1)), distances]).astype(np.float32)
    theirs, _, _ = umap_.fuzzy_simplicial_set(
        x, k, np.random.RandomState(0), "euclidean", knn_indices=knn_indices, knn_dists=knn_dists
    )
    np.testing.assert_allclose(ours, theirs.toarray(), atol=1e-5)


@pytest.mark.parametrize(("connectivity", "knn"), [("gauss", True), ("gauss", False), ("umap", True)])
def test_build_graphs_gives_the_cell_graph_and_the_standard_pipelines_graph(connectivity: str, knn: bool) -> None:
    """The second graph is the UMAP connectivities of the same kNN search, whatever the
    model's graph is; the first is :func:`build_graph`'s."""
    x = np.random.default_rng(12).normal(size=(70, 6))
    config = cg.GraphConfig(n_neighbors=8, connectivity=connectivity, knn=knn)
    graph, standard = cg.build_graphs(x, config)
    assert (graph != cg.build_graph(x, config)).nnz == 0
    indices, distances = cg.nearest_neighbors(x, 7, "cosine")
    expected = cg.umap_connectivities(indices, distances, 8).toarray()
    np.testing.assert_allclose(standard.toarray(), expected, rtol=1e-6)
    assert (standard is graph) == (connectivity == "umap")


def test_leiden_finds_planted_clusters() -> None:
    counts, truth = simulate_counts(300, 200, 3, seed=2, markers=30, fold=6.0)
    data = prepare(Counts(counts, np.arange(300).astype(str), np.arange(200).astype(str)), "rna", 100, 0)
    graph = cg.build_graph(data.features.rows(slice(None)), cg.GraphConfig(knn=True))
    labels = cg.leiden(graph, 0.3, seed=0)
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(truth, labels) > 0.9


def test_highly_variable_prefers_the_variable_genes() -> None:
    rng = np.random.default_rng(10)
    flat = rng.poisson(4.0, size=(300, 100))  # same mean as the variable genes, less variance
    on = rng.integers(0, 2, size=(300, 1))
    variable = rng.poisson(8.0, size=(300, 5)) * on
    counts = sp.csr_matrix(np.hstack([flat, variable]).astype(np.float32))
    assert highly_variable(normalise_log1p(counts), 5).tolist() == [100, 101, 102, 103, 104]


# -- the stopping rule ------------------------------------------------------------------------
def _trainer(tmp_cells: int = 120, **cfg) -> Trainer:
    counts, _ = simulate_counts(tmp_cells, 80, 3, seed=3, markers=20, fold=5.0)
    data = prepare(Counts(counts, np.arange(tmp_cells).astype(str), np.arange(80).astype(str)), "rna", 60, 0)
    gconf = cg.GraphConfig(knn=True)
    graph = cg.build_graph(data.features.rows(slice(None)), gconf)
    config = TrainConfig(**{"pretrain_epochs": 2, "cluster_epochs": 50, **cfg})
    torch.manual_seed(0)
    model = AttentionAE(ModelConfig(n_input=data.features.n_features, n_output=data.target.shape[1], n_heads=2))
    return Trainer(model, data, graph=graph, graph_config=gconf, cfg=config, device=torch.device("cpu"))


@pytest.mark.parametrize("batch_size", [4096, 50])
def test_clustering_stops_by_the_tolerance_rule(batch_size: int) -> None:
    trainer = _trainer(min_cluster_epochs=3, lr=1e-12, batch_size=batch_size)
    for bn in (trainer.model.BN_1, trainer.model.BN_2):
        bn.momentum = 0.0  # with lr ~0 and frozen running statistics nothing moves
    trainer.pretrain()
    trainer.cluster()
    h = trainer.history
    # delta[i] compares epoch i+1 with epoch i; the first epoch allowed to stop is 4 (> 3)
    assert h.stopped_epoch == 4 and h.cluster_delta == [0.0] * 4
    assert len(h.cluster_loss) == 4  # the stopping epoch takes no step


def test_pretraining_steps_in_mini_batches_and_self_training_in_full_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """120 cells: pre-training batches of 50 give 3 steps an epoch; self-training's
    batch (4096) holds every cell, one step an epoch, and its targets attend to all cells."""
    trainer = _trainer(pretrain_batch_size=50, min_cluster_epochs=0, tol=0.0, cluster_epochs=4)
    steps: list[int] = []
    step = Trainer._step

    def counted(self, optimizer, params, loss):  # noqa: ANN001, ANN202
        steps.append(self.batch_size)
        return step(self, optimizer, params, loss)

    monkeypatch.setattr(Trainer, "_step", counted)
    trainer.pretrain()
    assert steps == [50] * 6  # 2 epochs × 3 batches (120 cells split in 3)
    assert trainer.full_batch and trainer.key_index.size == 120
    trainer.cluster()
    assert steps[6:] == [120] * 4


def test_clustering_stop_is_the_first_epoch_under_tolerance() -> None:
    trainer = _trainer(min_cluster_epochs=2, tol=0.02, cluster_epochs=30)
    trainer.pretrain()
    trainer.cluster()
    h = trainer.history
    epochs = np.arange(1, len(h.cluster_delta) + 1)
    under = [e for e, d in zip(epochs, h.cluster_delta, strict=True) if e > 2 and d < 0.02]
    if h.stopped_epoch is None:
        assert not under and len(h.cluster_loss) == 30
    else:
        assert under[0] == h.stopped_epoch == epochs[-1]


def test_clustering_runs_all_epochs_without_tolerance() -> None:
    trainer = _trainer(min_cluster_epochs=0, tol=0.0, cluster_epochs=6)
    trainer.pretrain()
    trainer.cluster()
    assert trainer.history.stopped_epoch is None and len(trainer.history.cluster_loss) == 6


# -- the command --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sim_h5ad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_counts_h5ad(tmp_path_factory.mktemp("simrna") / "sim.h5ad", 400, 300, 4, seed=4, markers=40, fold=5.0)


def predict(model_path: Path, data_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply a saved clusterer to a data set on the CPU: ``(cell_ids, labels, z)`` of its
    cells with counts (load the model, preprocess as it was trained, embed and assign)."""
    saved = io.load_model(model_path)
    counts = read_counts(data_path, integer=saved.transform.modality == "rna")
    data = apply(counts, saved.transform)
    cg.check_neighbors(data.n_cells, saved.graph_config.n_neighbors)
    z, labels = embed_and_assign(
        saved.model,
        saved.centroids,
        data,
        graph_config=saved.graph_config,
        batch_size=saved.batch_size,
        seed=saved.seed,
        device=torch.device("cpu"),
    )
    return data.cell_ids, labels, z


def _check_outputs(out: Path, n_cells: int, with_truth: bool) -> dict:
    for name in (io.LABELS, io.EMBEDDING, io.MODEL, io.METRICS, io.PICTURE):
        assert (out / name).exists(), name
    labels = io.read_labels(out / io.LABELS)
    assert len(labels) == n_cells
    metrics = json.loads((out / io.METRICS).read_text())
    assert {"silhouette", "davies_bouldin"} <= metrics.keys()
    assert ("ari" in metrics) == with_truth and ("nmi" in metrics) == with_truth
    import zarr

    group = zarr.open_group(out / io.EMBEDDING, mode="r")
    assert group["embedding"].shape == (n_cells, 16)
    return metrics


def test_cluster_command_writes_outputs_and_reloads(sim_h5ad: Path, tmp_path: Path) -> None:
    out = tmp_path / "clusters"
    result = run_cli(
        "cluster",
        str(sim_h5ad),
        "-o",
        str(out),
        "--label-key",
        "cluster",
        "--n-hvg",
        "200",
        "--pretrain-epochs",
        "20",
        "--cluster-epochs",
        "5",
        "-q",
    )
    assert result.exit_code == 0, result.stderr
    metrics = _check_outputs(out, 400, with_truth=True)
    assert metrics["ari"] > 0.6, metrics
    saved = io.load_model(out / io.MODEL)
    assert saved.header["format"] == "hitanno.cluster_model"
    assert len(saved.transform.input_features) == 200
    cell_ids, labels, _ = predict(out / io.MODEL, sim_h5ad)
    written = io.read_labels(out / io.LABELS)
    assert [written[c] for c in cell_ids] == labels.tolist()


def test_model_header_key_and_the_older_one(tmp_path: Path) -> None:
    """The header is written under ``header`` (as annotation models); files written under
    ``hitanno`` before still load."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from hitanno_cli import artifacts
    from hitanno_cli.clustering.preprocess import Transform

    model = AttentionAE(ModelConfig(n_input=6, n_output=6, n_heads=2))
    header = artifacts.make_header(artifacts.CLUSTER_MODEL, {}, {})
    transform = Transform(
        "rna",
        [f"g{i}" for i in range(6)],
        np.arange(6),
        {"mean": np.zeros(6, np.float32), "std": np.ones(6, np.float32)},
    )
    path = tmp_path / "model.safetensors"
    io.save_model(
        path,
        model,
        centroids=np.zeros((3, 16), np.float32),
        transform=transform,
        graph_config=cg.GraphConfig(),
        train_config=TrainConfig().to_dict(),
        header=header,
    )
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
    assert "header" in metadata and "hitanno" not in metadata and metadata["content_hash"].startswith("sha256:")
    assert io.load_model(path).header == header
    tensors = load_file(str(path))
    older = {**header, "format_version": "1.0"}  # a 1.0 file: the old header key, no content hash
    legacy = {k: v for k, v in metadata.items() if k not in ("header", "content_hash")}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**legacy, "hitanno": json.dumps(older)})
    saved = io.load_model(old)
    assert saved.header == older and saved.centroids.shape == (3, 16)
    for name, edit in (("tensor", "centroids"), ("metadata", "modality")):  # an edited 1.1 file is refused
        edited = tmp_path / f"edited_{name}.safetensors"
        changed = dict(metadata)
        if name == "tensor":
            save_file({**tensors, edit: tensors[edit] + 1}, str(edited), metadata=changed)
        else:
            save_file(tensors, str(edited), metadata={**changed, edit: "atac"})
        with pytest.raises(UserError, match="does not match its hash"):
            io.load_model(edited)


def test_mini_batches_and_sampling_then_assigning(sim_h5ad: Path, tmp_path: Path) -> None:
    out = tmp_path / "mb"
    result = run_cli(
        "cluster",
        str(sim_h5ad),
        "-o",
        str(out),
        "--label-key",
        "cluster",
        "--n-hvg",
        "200",
        "--batch-size",
        "128",
        "--max-cells",
        "300",
        "--knn",
        "--pretrain-epochs",
        "8",
        "--cluster-epochs",
        "4",
        "-q",
    )
    assert result.exit_code == 0, result.stderr
    metrics = _check_outputs(out, 400, with_truth=True)
    assert metrics["n_training_cells"] == 300
    assert metrics["ari"] > 0.6, metrics
    cell_ids, labels, _ = predict(out / io.MODEL, sim_h5ad)
    written = io.read_labels(out / io.LABELS)
    assert [written[c] for c in cell_ids] == labels.tolist()


def test_atac_modality(tmp_path: Path) -> None:
    import anndata as ad
    import pandas as pd

    counts, truth = simulate_counts(300, 400, 3, seed=5, markers=60, fold=8.0, mean_library=300.0)
    counts.data[:] = 1.0
    obs = pd.DataFrame({"cell_type": [f"t{c}" for c in truth]}, index=[f"c{i}" for i in range(300)])
    var = pd.DataFrame(index=[f"chr1:{i * 1000}-{i * 1000 + 500}" for i in range(400)])
    path = tmp_path / "atac.h5ad"
    ad.AnnData(X=counts, obs=obs, var=var).write_h5ad(path)
    out = tmp_path / "atac_out"
    result = run_cli(
        "cluster",
        str(path),
        "-o",
        str(out),
        "--modality",
        "atac",
        "-l",
        "cell_type",
        "--pretrain-epochs",
        "30",
        "--cluster-epochs",
        "5",
        "-q",
    )
    assert result.exit_code == 0, result.stderr
    metrics = _check_outputs(out, 300, with_truth=True)
    assert metrics["ari"] > 0.5, metrics
    saved = io.load_model(out / io.MODEL)
    assert saved.model.config.likelihood == "bernoulli"
    cell_ids, labels, _ = predict(out / io.MODEL, path)
    written = io.read_labels(out / io.LABELS)
    assert [written[c] for c in cell_ids] == labels.tolist()


def test_empty_cells_get_an_empty_cluster(tmp_path: Path) -> None:
    import anndata as ad
    import pandas as pd

    counts, _ = simulate_counts(120, 100, 2, seed=6)
    counts = counts.tolil()
    counts[[3, 50], :] = 0
    counts = counts.tocsr()
    path = tmp_path / "e.h5ad"
    ad.AnnData(
        X=counts,
        obs=pd.DataFrame(index=[f"c{i}" for i in range(120)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(100)]),
    ).write_h5ad(path)
    out = tmp_path / "e_out"
    result = run_cli("cluster", str(path), "-o", str(out), "--n-hvg", "80", *FAST)
    assert result.exit_code == 0, result.stderr
    labels = io.read_labels(out / io.LABELS)
    assert labels["c3"] is None and labels["c50"] is None and labels["c4"] is not None
    assert "2 cells without counts" in result.stderr


# -- bad input -----------------------------------------------------------------------------------
def _write(path: Path, x, labels=None) -> Path:
    import anndata as ad
    import pandas as pd

    n_obs, n_vars = x.shape
    obs = pd.DataFrame(
        {"cell_type": labels if labels is not None else ["a"] * n_obs}, index=[f"c{i}" for i in range(n_obs)]
    )
    ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_vars)])).write_h5ad(path)
    return path


def _assert_refused(args: list[str], match: str, out: Path) -> None:
    before = sorted(out.parent.iterdir())
    result = run_cli(*args)
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0], lines[0]
    assert sorted(out.parent.iterdir()) == before, "something was written"


def test_refuses_non_count_data(tmp_path: Path) -> None:
    x = np.log1p(np.random.default_rng(0).poisson(2.0, size=(40, 30))).astype(np.float32)
    path = _write(tmp_path / "lognorm.h5ad", x)
    _assert_refused(["cluster", str(path), "-o", str(tmp_path / "o")], "non-integer values", tmp_path / "o")


def test_refuses_fewer_cells_than_neighbours(tmp_path: Path) -> None:
    path = _write(tmp_path / "few.h5ad", np.random.default_rng(0).poisson(2.0, size=(10, 30)).astype(np.float32))
    _assert_refused(["cluster", str(path), "-o", str(tmp_path / "o")], "fewer than --n-neighbors 15", tmp_path / "o")


def test_refuses_missing_label_key(tmp_path: Path) -> None:
    path = _write(tmp_path / "ok.h5ad", np.random.default_rng(0).poisson(2.0, size=(40, 30)).astype(np.float32))
    _assert_refused(
        ["cluster", str(path), "-o", str(tmp_path / "o"), "--label-key", "celltype"],
        "label key 'celltype'",
        tmp_path / "o",
    )


def test_refuses_all_zero_genes(tmp_path: Path) -> None:
    path = _write(tmp_path / "zero.h5ad", np.zeros((40, 30), dtype=np.float32))
    _assert_refused(["cluster", str(path), "-o", str(tmp_path / "o")], "zero counts", tmp_path / "o")


def test_refuses_umap_without_knn(tmp_path: Path) -> None:
    path = _write(tmp_path / "ok.h5ad", np.random.default_rng(0).poisson(2.0, size=(40, 30)).astype(np.float32))
    _assert_refused(
        ["cluster", str(path), "-o", str(tmp_path / "o"), "--connectivity", "umap", "--no-knn"],
        "--no-knn applies to gauss only",
        tmp_path / "o",
    )


def test_options_defaults_and_the_published_values() -> None:
    """Defaults that depart from the published ones are the documented few; the rest
    are published values."""
    import inspect

    from hitanno_cli.commands.cluster import cluster_cmd

    defaults = {name: p.default for name, p in inspect.signature(cluster_cmd).parameters.items()}
    assert defaults["resolution"] == "auto" and defaults["knn"] is True
    assert defaults["pretrain_epochs"] == 50 and defaults["pretrain_batch_size"] == 256  # published: 200, full
    assert (TrainConfig().pretrain_epochs, TrainConfig().pretrain_batch_size) == (50, 256)
    assert defaults["n_heads"] == 8 and defaults["n_hvg"] == 2500
    assert defaults["n_neighbors"] == 15 and defaults["max_cells"] == 4000
    assert defaults["cluster_epochs"] == 100 and defaults["lr"] == 1e-3
    assert defaults["connectivity"].value == "gauss"
    cfg = TrainConfig()
    assert (cfg.graph_weight, cfg.cluster_recon_weight, cfg.cluster_graph_weight) == (0.1, 0.1, 0.01)
    assert (cfg.grad_clip, cfg.lr_step, cfg.lr_gamma, cfg.tol, cfg.min_cluster_epochs) == (3.0, 40, 0.5, 1e-3, 20)
