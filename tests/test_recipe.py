"""Training recipes: the pinned default, the published schedule, augmentation, LSI start."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hitanno_cli.batches import OpenRows
from hitanno_cli.checkpoint import read_metadata
from hitanno_cli.errors import UserError
from hitanno_cli.sentences import SentenceStore
from hitanno_cli.training import RECIPES, TrainOptions, drop_open_peaks, lsi_peak_embeddings, recipe_options
from conftest import run_cli
from test_training import TINY_CLI, stores  # noqa: F401 (the fixture)


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
        kept = dropped.positions[dropped.indptr[i]:dropped.indptr[i + 1]]
        assert set(kept) <= set(cells.positions[cells.indptr[i]:cells.indptr[i + 1]])
    assert 196 * 0.4 <= dropped.indptr[3] - dropped.indptr[2] < 196  # one cell loses at most 60 %
    again = drop_open_peaks(cells, 0.6, np.random.default_rng(0))
    assert np.array_equal(again.positions, dropped.positions)
    assert np.array_equal(drop_open_peaks(cells, 0.0, np.random.default_rng(0)).positions, cells.positions)


def test_lsi_embeddings_give_co_opened_peaks_similar_vectors(stores: dict) -> None:  # noqa: F811
    store = SentenceStore(stores["ref"])
    rows = np.arange(store.n_cells)
    table = lsi_peak_embeddings(store, rows, 16, seed=0).numpy()
    n_positions = len(store.cell_types) * store.peaks_per_type
    assert table.shape == (n_positions, 16) and np.sqrt((table ** 2).mean()) == pytest.approx(0.02, rel=1e-4)
    indptr, positions = store.read_open(0, store.n_cells)
    never = np.setdiff1d(np.arange(n_positions), positions)
    assert np.abs(table[never]).max() == 0 if len(never) else True
    assert np.array_equal(table, lsi_peak_embeddings(store, rows, 16, seed=0).numpy())


def test_train_command_takes_the_recipe_then_explicit_flags(stores: dict, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "model"
    result = run_cli("train", "-s", str(stores["ref"]), "-p", str(stores["panel"]), "-o", str(out),
                     "--recipe", "published", "--epochs", "1", "--peak-dropout", "0.3", *TINY_CLI)
    assert result.exit_code == 0, result.stderr
    params = json.loads(read_metadata(out / "model.safetensors")["header"])["params"]
    assert params["lr"] == 1e-4 and params["optimizer"] == "adam" and params["peak_dropout"] == 0.3
    assert params["epochs"] == 1 and params["model"]["embed_dim"] == 16
    bad = run_cli("train", "-s", str(stores["ref"]), "-p", str(stores["panel"]), "-o", str(tmp_path / "x"),
                  "--recipe", "nope", *TINY_CLI)
    assert bad.exit_code == 2 and "unknown recipe" in bad.stderr
