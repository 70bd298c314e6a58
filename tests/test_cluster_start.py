"""``hitanno cluster``: the initial partition, the scATAC-seq targets, the picture caption
and the progress bar of an early stop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import run_cli
from sklearn.metrics import adjusted_rand_score

from hitanno_cli.clustering import graph as cg
from hitanno_cli.clustering import inference, io, partition
from hitanno_cli.clustering.counts import Counts
from hitanno_cli.clustering.preprocess import prepare


def _segments(n_per: int, n_clusters: int, *, length: float, spread: float, seed: int):
    """Clusters stretched along a line each (as a differentiation continuum), far apart."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=spread, size=(n_clusters, 16))
    directions = rng.normal(size=(n_clusters, 16))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    truth = np.repeat(np.arange(n_clusters), n_per)
    along = rng.uniform(-length / 2, length / 2, size=truth.size)
    z = centres[truth] + along[:, None] * directions[truth] + rng.normal(size=(truth.size, 16))
    return z.astype(np.float32), truth


def test_merge_small_moves_tiny_clusters_to_the_nearest_centroid() -> None:
    z = np.concatenate([np.zeros((50, 2)), np.full((40, 2), 10.0), [[9.0, 9.0], [9.5, 9.5], [1.0, 0.0]]])
    labels = np.concatenate([np.zeros(50, int), np.ones(40, int), [2, 2, 3]])
    merged = partition.merge_small(z, labels, min_size=5)
    assert np.bincount(merged).tolist() == [51, 42]
    assert merged[90] == merged[91] == merged[50] and merged[92] == merged[0]
    assert partition.min_cluster_size(100) == 5 and partition.min_cluster_size(50_000) == 250


def test_dissolve_small_sends_a_tiny_final_cluster_to_the_nearest_remaining_centroid() -> None:
    z = np.concatenate([np.zeros((50, 2)), np.full((40, 2), 10.0), [[8.0, 8.0], [2.0, 1.0], [6.0, 6.0]]])
    centroids = np.array([[0.0, 0.0], [10.0, 10.0], [5.0, 5.0], [30.0, 30.0]], dtype=np.float32)
    labels = np.concatenate([np.zeros(50, int), np.ones(40, int), [2, 2, 2]])  # centroid 3 holds no cell
    kept = inference.dissolve_small(z.astype(np.float32), labels, centroids, min_size=5)
    assert kept[:90].tolist() == labels[:90].tolist()  # cells of kept clusters stay
    assert kept[90:].tolist() == [1, 0, 1]  # each dissolved cell goes to its own nearest kept centroid
    # the saved centroids reproduce the labels: assigning to the kept ones gives the same
    again = inference.assign(torch.from_numpy(z.astype(np.float32)), torch.from_numpy(centroids[[0, 1]]))
    assert np.array_equal(np.array([0, 1])[again], kept)
    # nothing is dissolved when every cluster is large enough, and the largest always stays
    assert inference.dissolve_small(z.astype(np.float32), labels, centroids, min_size=3) is labels
    alone = inference.dissolve_small(z[:3].astype(np.float32), np.array([2, 2, 0]), centroids, min_size=5)
    assert alone.tolist() == [2, 2, 2]


def test_auto_resolution_finds_the_planted_clusters_where_one_leiden_run_splits_them() -> None:
    z, truth = _segments(150, 4, length=20.0, spread=50.0, seed=0)
    config = cg.GraphConfig(knn=True)
    fixed = partition.initial_partition(z, resolution=1.0, graph_config=config, seed=0)
    auto = partition.initial_partition(z, resolution="auto", graph_config=config, seed=0)
    assert fixed.n_clusters > 4  # one Leiden run at the published resolution over-splits
    assert auto.n_clusters == 4 and adjusted_rand_score(truth, auto.labels) == 1.0
    assert auto.scores[str(auto.resolution)] == max(auto.scores.values())
    assert auto.graph == "latent"
    assert auto.summary()["n_clusters"] == 4


def test_auto_resolution_falls_back_without_clear_clusters() -> None:
    z = np.random.default_rng(1).normal(size=(400, 16)).astype(np.float32)
    auto = partition.initial_partition(z, resolution="auto", graph_config=cg.GraphConfig(knn=True), seed=0)
    assert max(auto.scores.values()) < partition.CLEAR_SILHOUETTE
    assert auto.resolution == partition.FALLBACK_RESOLUTION
    assert auto.graph == "latent"


def test_auto_falls_back_to_the_cell_graph_without_clear_latent_clusters() -> None:
    """Latent codes with four overlapping groups (no partition reaches the clear
    silhouette): Leiden at 1.0 splits them into many pieces on their own graph; given the
    cell graph (here: a graph that joins only cells of the same group) the start is that
    graph's partition, the four groups."""
    rng = np.random.default_rng(3)
    truth = np.repeat(np.arange(4), 150)
    corners = 3.0 * np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    z = (rng.normal(size=(600, 2)) + corners[truth]).astype(np.float32)
    config = cg.GraphConfig(knn=True)
    latent_only = partition.initial_partition(z, resolution="auto", graph_config=config, seed=0)
    assert max(latent_only.scores.values()) < partition.CLEAR_SILHOUETTE
    assert latent_only.graph == "latent" and latent_only.n_clusters > 4
    order = np.argsort(rng.random((600, 600)), axis=1)
    same = truth[:, None] == truth[order]  # 10 random neighbours within the group
    rows = np.repeat(np.arange(600), 10)
    cols = np.concatenate([order[i][same[i]][:10] for i in range(600)])
    groups = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(600, 600))
    chosen = partition.initial_partition(
        z, resolution="auto", graph_config=config, seed=0, cell_graph=groups.maximum(groups.T)
    )
    assert chosen.graph == "cells" and adjusted_rand_score(truth, chosen.labels) == 1.0
    assert chosen.summary()["graph"] == "cells" and "cells 1.0" in chosen.scores
    # a clear latent partition is kept whatever the cell graph says
    clear, planted = _segments(150, 4, length=20.0, spread=50.0, seed=0)
    kept = partition.initial_partition(
        clear, resolution="auto", graph_config=config, seed=0, cell_graph=groups.maximum(groups.T)
    )
    assert kept.graph == "latent" and adjusted_rand_score(planted, kept.labels) == 1.0


def test_atac_targets_are_the_informative_peaks() -> None:
    """Peaks open in most cells of every type are the most often open, yet say nothing
    about types: the reconstruction targets are the peaks the LSI needs instead."""
    rng = np.random.default_rng(2)
    truth = np.repeat(np.arange(3), 100)
    common = rng.random((300, 60)) < 0.8  # uninformative, often open
    markers = np.zeros((300, 90), dtype=bool)
    for t in range(3):
        block = markers[truth == t, t * 30 : (t + 1) * 30]
        markers[truth == t, t * 30 : (t + 1) * 30] = rng.random(block.shape) < 0.4
    background = rng.random((300, 150)) < 0.02
    x = sp.csr_matrix(np.hstack([common, markers, background]).astype(np.float32))
    names = np.array([f"chr1:{i * 1000}-{i * 1000 + 500}" for i in range(x.shape[1])])
    data = prepare(Counts(x, np.arange(300).astype(str), names), "atac", 60, 0)
    targets = data.transform.target_index
    assert np.mean((targets >= 60) & (targets < 150)) > 0.8, targets
    most_open = np.argsort(-np.asarray(x.sum(axis=0)).ravel())[:60]
    assert np.mean(most_open < 60) > 0.8  # the rule it replaces would pick the common peaks


def test_picture_caption_says_when_it_is_not_umap(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    assert io.picture_caption("UMAP") is None
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "umap" else real(name, *a))
    assert io.picture_caption("PCA") == "PCA of the embedding, not UMAP: umap-learn is not installed"


def test_early_stop_completes_the_progress_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    from contextlib import contextmanager

    from test_cluster import _trainer

    from hitanno_cli.clustering import trainer as trainer_module

    calls: list[tuple[str, dict]] = []

    class Bar:
        def advance(self, n: float = 1) -> None:
            calls.append(("advance", {"n": n}))

        def update(self, **fields: object) -> None:
            calls.append(("update", fields))

    @contextmanager
    def progress(description: str, total: float | None, unit: str = "cells"):
        calls.append(("start", {"description": description, "total": total}))
        yield Bar()

    monkeypatch.setattr(trainer_module.console, "progress", progress)
    trainer = _trainer(min_cluster_epochs=3, lr=1e-12)
    for bn in (trainer.model.BN_1, trainer.model.BN_2):
        bn.momentum = 0.0
    trainer.pretrain()
    trainer.cluster()
    stop = trainer.history.stopped_epoch
    assert stop is not None and stop < trainer.cfg.cluster_epochs
    last = calls[-1]
    assert last[0] == "update" and last[1]["total"] == last[1]["completed"] == stop
    assert "converged" in str(last[1]["description"])


def test_refuses_a_bad_resolution(tmp_path: Path) -> None:
    from test_cluster import _assert_refused, _write

    path = _write(tmp_path / "ok.h5ad", np.random.default_rng(0).poisson(2.0, size=(40, 30)).astype(np.float32))
    for bad in ("fast", "0", "-1"):
        _assert_refused(
            ["cluster", str(path), "-o", str(tmp_path / "o"), "--resolution", bad], "--resolution", tmp_path / "o"
        )


@pytest.mark.slow  # an end-to-end run with its picture (~15 s on 2 cores)
def test_cluster_reports_the_initial_partition(tmp_path: Path) -> None:
    import json

    from hitanno_cli.clustering.simulate import write_counts_h5ad

    path = write_counts_h5ad(tmp_path / "s.h5ad", 240, 150, 3, seed=7, markers=40, fold=6.0)
    out = tmp_path / "o"
    args = ["cluster", str(path), "-o", str(out), "-l", "cluster", "--n-hvg", "100", "-q"]
    result = run_cli(*args, "--pretrain-epochs", "15", "--cluster-epochs", "3")
    assert result.exit_code == 0, result.stderr
    metrics = json.loads((out / io.METRICS).read_text())
    start = metrics["training"]["initial_partition"]
    scored = set(start["silhouette_by_resolution"])
    fallback = {"cells 1.0"} if start["graph"] == "cells" else set()
    assert scored == {str(r) for r in partition.RESOLUTIONS} | fallback
    assert start["n_clusters"] == metrics["training"]["n_leiden_init_clusters"]
    assert metrics["header"]["params"]["train"]["resolution"] == "auto"
    dissolved = metrics["dissolved_small_clusters"]
    assert dissolved["min_size"] == 5 and dissolved["cells"] >= dissolved["clusters"] >= 0
    assert min(metrics["cluster_sizes"]) >= 5 or metrics["n_clusters"] == 1
