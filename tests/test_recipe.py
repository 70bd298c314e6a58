"""Training recipes: the pinned default, the published schedule, augmentation, LSI start."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_training import TINY_CLI

from hitanno_cli.batches import OpenRows
from hitanno_cli.checkpoint import read_metadata
from hitanno_cli.errors import UserError
from hitanno_cli.model import HitAnno, ModelConfig
from hitanno_cli.sentences import SentenceStore
from hitanno_cli.training import RECIPES, TrainOptions, recipe_options
from hitanno_cli.training.data import drop_open_peaks, lsi_peak_embeddings, reference_tfidf
from hitanno_cli.training.objective import parameter_groups


def test_default_recipe_is_pinned() -> None:
    """Changing the default recipe must be deliberate: update docs/recipe.md and this test."""
    assert RECIPES["default"] == {
        "lr": 1e-3,
        "batch_size": 256,
        "min_steps_per_epoch": 16,
        "optimizer": "adamw",
        "weight_decay": 0.05,
        "epochs": 8,
        "warmup_epochs": 2.0,
        "val_fraction": 0.0,
        "peak_dropout": 0.5,
        "label_smoothing": 0.3,
        "class_weight": "balanced",
        "embed_lr_scale": 30.0,
        "model": {"embed_dim": 16, "linear_path": True},
    }
    default = recipe_options()
    assert (default.epochs, default.warmup_epochs, default.val_fraction, default.patience) == (8, 2.0, 0.0, 3)
    default.check()


def test_published_recipe_is_the_spec_schedule() -> None:
    published = recipe_options("published")
    assert published == TrainOptions()
    assert (published.lr, published.epochs, published.warmup_epochs, published.batch_size) == (1e-4, 20, 3.0, 64)
    assert (published.optimizer, published.weight_decay, published.val_fraction) == ("adam", 0.0, 0.25)
    assert (published.patience, published.min_epochs, published.peak_dropout, published.label_smoothing) == (3, 5, 0, 0)
    assert published.model == {} and published.embed_init == "random" and published.class_weight == "none"


def test_explicit_values_override_the_recipe_and_unknown_recipes_are_refused() -> None:
    options = recipe_options("default", lr=5e-4, model={"dropout": 0.2})
    assert options.lr == 5e-4 and options.model["dropout"] == 0.2
    assert options.model["embed_dim"] == RECIPES["default"]["model"]["embed_dim"]
    with pytest.raises(UserError, match="unknown recipe"):
        recipe_options("fastest")


def test_peak_dropout_keeps_a_seeded_subset_of_each_cells_peaks() -> None:
    cells = OpenRows(np.array([0, 4, 4, 200]), np.concatenate([[1, 5, 7, 9], np.arange(196)]))
    dropped = drop_open_peaks(cells, 0.6, np.random.default_rng(0))
    assert dropped.n == 3 and dropped.indptr[2] - dropped.indptr[1] == 0
    for i in range(3):
        kept = dropped.positions[dropped.indptr[i] : dropped.indptr[i + 1]]
        assert set(kept) <= set(cells.positions[cells.indptr[i] : cells.indptr[i + 1]])
    assert 196 * 0.4 <= dropped.indptr[3] - dropped.indptr[2] < 196  # one cell loses at most 60 %
    again = drop_open_peaks(cells, 0.6, np.random.default_rng(0))
    assert np.array_equal(again.positions, dropped.positions)
    assert np.array_equal(drop_open_peaks(cells, 0.0, np.random.default_rng(0)).positions, cells.positions)


def test_lsi_embeddings_give_co_opened_peaks_similar_vectors(stores: dict) -> None:  # noqa: F811
    store = SentenceStore(stores["ref"])
    rows = np.arange(store.n_cells)
    tfidf, _ = reference_tfidf(store, rows)
    table = lsi_peak_embeddings(tfidf, 16, seed=0).numpy()
    n_positions = len(store.cell_types) * store.peaks_per_type
    assert table.shape == (n_positions, 16) and np.sqrt((table**2).mean()) == pytest.approx(0.02, rel=1e-4)
    cells = store.read_open(0, store.n_cells)
    positions = cells.positions
    never = np.setdiff1d(np.arange(n_positions), positions)
    assert np.abs(table[never]).max() == 0 if len(never) else True
    assert np.array_equal(table, lsi_peak_embeddings(tfidf, 16, seed=0).numpy())


def test_train_command_takes_the_recipe_then_explicit_flags(stores: dict, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "model"
    result = run_cli(
        "train",
        "-s",
        str(stores["ref"]),
        "-p",
        str(stores["panel"]),
        "-o",
        str(out),
        "--recipe",
        "published",
        "--epochs",
        "1",
        "--peak-dropout",
        "0.3",
        *TINY_CLI,
    )
    assert result.exit_code == 0, result.stderr
    params = json.loads(read_metadata(out / "model.safetensors")["header"])["params"]
    assert params["lr"] == 1e-4 and params["optimizer"] == "adam" and params["peak_dropout"] == 0.3
    assert params["epochs"] == 1 and params["model"]["embed_dim"] == 16
    bad = run_cli(
        "train",
        "-s",
        str(stores["ref"]),
        "-p",
        str(stores["panel"]),
        "-o",
        str(tmp_path / "x"),
        "--recipe",
        "nope",
        *TINY_CLI,
    )
    assert bad.exit_code == 2 and "unknown recipe" in bad.stderr


def test_linear_path_is_the_same_on_both_level1_paths_and_tables_get_their_own_rate() -> None:
    config = ModelConfig(n_types=3, peaks_per_type=5, embed_dim=8, level1_heads=2, level2_heads=2, linear_path=True)
    sparse = HitAnno(config)
    torch.nn.init.normal_(sparse.linear.weight.weight)
    dense = HitAnno(ModelConfig(**{**config.to_dict(), "attention": "dense"}))
    dense.load_state_dict(sparse.state_dict())
    sparse.eval(), dense.eval()
    indptr, positions = torch.tensor([0, 2, 2, 5]), torch.tensor([1, 7, 0, 3, 14])
    assert torch.allclose(sparse(indptr, positions).logits, dense(indptr, positions).logits, atol=1e-5)
    plain = HitAnno(ModelConfig(**{**config.to_dict(), "linear_path": False}))
    plain.load_state_dict({k: v for k, v in sparse.state_dict().items() if not k.startswith("linear.")})
    plain.eval()
    wide = sparse.linear(indptr, positions)
    assert wide.abs().sum() > 0 and wide[1].abs().sum() == 0  # the empty cell gets nothing
    assert torch.allclose(sparse(indptr, positions).logits, plain(indptr, positions).logits + wide, atol=1e-6)
    groups = parameter_groups(sparse, 1e-3, 30.0)
    assert [g["lr"] for g in groups] == [1e-3, 3e-2]
    tables = {id(p) for p in groups[1]["params"]}
    assert id(sparse.embed.identity.weight) in tables and id(sparse.linear.weight.weight) in tables
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in sparse.parameters())


def test_class_weights_weigh_cells_not_the_smoothing_mass() -> None:
    """Each cell's smoothed loss is scaled by its own class's weight; the mean divides by the
    weights' sum. (PyTorch's ``weight=`` would also weigh every other class's smoothing term.)"""
    from hitanno_cli.training.objective import weighted_cross_entropy

    gen = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(12, 5, generator=gen), torch.randint(0, 5, (12,), generator=gen)
    weights = torch.tensor([1.0, 4.0, 0.5, 2.0, 8.0])
    log_p = logits.log_softmax(1)
    smoothed = -(0.8 * log_p[torch.arange(12), targets] + 0.2 / 5 * log_p.sum(1))
    w = weights[targets]
    expected = float((w * smoothed).sum() / w.sum())
    assert float(weighted_cross_entropy(logits, targets, weights, smoothing=0.2)) == pytest.approx(expected, rel=1e-6)
    torch_weighted = float(torch.nn.functional.cross_entropy(logits, targets, weight=weights, label_smoothing=0.2))
    assert abs(torch_weighted - expected) > 1e-3
    plain = torch.nn.functional.cross_entropy(logits, targets, weight=weights)
    assert float(weighted_cross_entropy(logits, targets, weights)) == pytest.approx(float(plain), rel=1e-6)


def test_batch_shrinks_to_give_small_references_enough_steps() -> None:
    from hitanno_cli.training.data import effective_batch_size

    assert effective_batch_size(256, 16, 7700) == 256
    assert effective_batch_size(256, 16, 600) == 37
    assert effective_batch_size(256, 16, 5) == 1
    assert effective_batch_size(256, 0, 600) == 256


def test_linear_path_reads_l2_normalised_tfidf_rows() -> None:
    """With idf the linear logits are W · (TF-IDF row / ‖row‖); without, W · (binary / √n)."""
    from hitanno_cli.model import LinearPath

    gen = torch.Generator().manual_seed(1)
    path = LinearPath(20, 3)
    torch.nn.init.normal_(path.weight.weight, generator=gen)
    states = torch.rand(4, 20, generator=gen) < 0.3
    states[3] = False  # an all-closed cell gives zeros
    rows, positions = states.nonzero(as_tuple=True)
    indptr = torch.zeros(5, dtype=torch.long)
    indptr[1:] = torch.bincount(rows, minlength=4).cumsum(0)
    w = path.weight.weight.detach()
    n = states.sum(1, keepdim=True).clamp(min=1)
    binary = states.float() / n.sqrt()
    assert torch.allclose(path(indptr, positions), binary @ w, atol=1e-5)
    path.idf.copy_(torch.rand(20, generator=gen) * 10)
    tfidf = torch.where(states, torch.log1p(1e4 * path.idf / n), torch.zeros(()))
    rows_l2 = tfidf / tfidf.norm(dim=1, keepdim=True).clamp(min=1e-12)
    assert torch.allclose(path(indptr, positions), rows_l2 @ w, atol=1e-5)


def test_balanced_sampling_draws_rare_classes_as_often_as_common_ones(stores: dict) -> None:  # noqa: F811
    from hitanno_cli.batches import ShuffledCells
    from hitanno_cli.training.data import sampling_rates, training_labels

    store = SentenceStore(stores["ref"])
    rows, targets = training_labels(store)
    n_types = len(store.cell_types)
    counts = np.bincount(targets, minlength=n_types)
    assert counts.max() >= 3 * counts[counts > 0].min()  # the fixture is imbalanced

    def drawn(mode: str, epoch: int) -> np.ndarray:
        cells = ShuffledCells(store, rows, targets, batch_size=64, class_rates=sampling_rates(targets, n_types, mode))
        return np.concatenate([b.targets for b in cells.epoch(seed=0, epoch=epoch)])

    uniform = drawn("uniform", 0)
    assert np.array_equal(np.bincount(uniform, minlength=n_types), counts)  # each cell once
    balanced = np.concatenate([drawn("balanced", e) for e in range(5)])
    share = np.bincount(balanced, minlength=n_types)[counts > 0] / len(balanced)
    assert len(balanced) == 5 * len(targets)
    assert np.allclose(share, 1 / (counts > 0).sum(), atol=0.03)
    assert np.array_equal(drawn("balanced", 3), drawn("balanced", 3))  # fixed by (seed, epoch)
