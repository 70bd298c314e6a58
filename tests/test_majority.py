"""Majority voting over an over-clustering: fixes minority errors, keeps Unassigned, is seeded."""

from __future__ import annotations

import numpy as np
import pytest

from hitanno_cli.artifacts import UNASSIGNED
from hitanno_cli.errors import UserError
from hitanno_cli.majority import majority_vote, over_clustering_resolution

N_TYPES, PER_TYPE = 6, 80


def planted(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian clusters in 8 dimensions and their true labels."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(N_TYPES, 8)) * 10
    truth = np.repeat(np.arange(N_TYPES), PER_TYPE)
    x = (centers[truth] + rng.normal(size=(truth.size, 8))).astype(np.float32)
    return x, np.array([f"type{t}" for t in truth], dtype=object)


def with_noise(truth: np.ndarray, share: float, seed: int = 1) -> np.ndarray:
    """``truth`` with a random ``share`` of cells given another type's label."""
    rng = np.random.default_rng(seed)
    noisy = truth.copy()
    wrong = rng.random(truth.size) < share
    shift = rng.integers(1, N_TYPES, wrong.sum())
    noisy[wrong] = [f"type{(int(t[4:]) + s) % N_TYPES}" for t, s in zip(truth[wrong], shift)]
    return noisy


def test_majority_voting_fixes_the_minority_wrong_labels() -> None:
    x, truth = planted()
    noisy = with_noise(truth, 0.25)
    assert (noisy == truth).mean() < 0.8
    vote = majority_vote(x, noisy, seed=0)  # the cell-count rule: resolution 5, over-clustered
    assert vote.resolution == 5.0 and vote.n_clusters >= N_TYPES
    assert (vote.labels == truth).all()
    assert vote.clusters.shape == (truth.size,) and vote.clusters.min() == 0
    # every cell of a cluster has that cluster's label and share
    for c in range(vote.n_clusters):
        members = vote.clusters == c
        assert len(set(vote.labels[members])) == 1 and np.ptp(vote.confidence[members]) == 0
    assert 0.5 < vote.confidence.min() and vote.confidence.max() <= 1.0


def test_unassigned_cells_do_not_vote_and_an_unassigned_cluster_stays_unassigned() -> None:
    x, truth = planted()
    labels = truth.copy()
    labels[truth == "type0"] = UNASSIGNED  # a whole cluster left Unassigned
    type1 = np.flatnonzero(truth == "type1")
    labels[type1[: PER_TYPE * 3 // 4]] = UNASSIGNED  # most of another: the rest still decide
    vote = majority_vote(x, labels, resolution=0.5, seed=0)
    assert (vote.labels[truth == "type0"] == UNASSIGNED).all()
    assert (vote.confidence[truth == "type0"] == 0).all()
    assert (vote.labels[type1] == "type1").all() and (vote.confidence[type1] == 1).all()
    others = ~np.isin(truth, ["type0", "type1"])
    assert (vote.labels[others] == truth[others]).all()


def test_the_same_seed_gives_the_same_clusters() -> None:
    x, truth = planted(seed=3)
    noisy = with_noise(truth, 0.3, seed=4)
    first, second = majority_vote(x, noisy, seed=7), majority_vote(x, noisy, seed=7)
    assert np.array_equal(first.clusters, second.clusters)
    assert np.array_equal(first.labels, second.labels)
    assert np.array_equal(first.confidence, second.confidence)


def test_the_resolution_grows_with_the_cell_count() -> None:
    assert [over_clustering_resolution(n) for n in (100, 4_999, 5_000, 19_999, 20_000, 99_999, 10**6)] == [
        5.0,
        5.0,
        10.0,
        10.0,
        15.0,
        20.0,
        30.0,
    ]


@pytest.mark.parametrize(
    ("n_cells", "n_labels", "kwargs", "message"),
    [
        (40, 39, {}, "40 embeddings but 39 labels"),
        (10, 10, {}, "only 10 cells, fewer than n_neighbors 15"),
        (40, 40, {"n_neighbors": 1}, "at least 2"),
        (40, 40, {"resolution": 0.0}, "must be positive"),
    ],
)
def test_bad_input_is_a_user_error(n_cells: int, n_labels: int, kwargs: dict, message: str) -> None:
    x = np.random.default_rng(0).normal(size=(n_cells, 4))
    with pytest.raises(UserError, match=message):
        majority_vote(x, np.array(["a"] * n_labels, dtype=object), **kwargs)


def test_embeddings_must_be_a_finite_matrix() -> None:
    with pytest.raises(UserError, match="matrix"):
        majority_vote(np.zeros(20), np.array(["a"] * 20))
    x = np.zeros((20, 3))
    x[3, 1] = np.nan
    with pytest.raises(UserError, match="NaN"):
        majority_vote(x, np.array(["a"] * 20))
