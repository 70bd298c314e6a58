"""Self-training on a query (``train --adapt-to``): pseudo-label choice, combined store, command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from hitanno_cli.adaptation import _packed_rows, confident_rows
from hitanno_cli.checkpoint import ADAPTATION, read_metadata
from hitanno_cli.sentences import SentenceStore, write_store

TINY_CLI = [
    "--embed-dim",
    "16",
    "--heads",
    "2",
    "--ff",
    "16",
    "--head-hidden",
    "8",
    "--epochs",
    "2",
    "--device",
    "cpu",
    "-q",
]


def test_confident_rows_takes_the_top_share_of_each_predicted_class() -> None:
    predicted = np.array([0, 0, 0, 0, 1, 1, 2, 0])
    confidence = np.array([0.9, 0.2, 0.8, 0.5, 0.3, 0.7, 0.1, 0.95])
    # class 0 (5 cells) keeps ceil(0.5·5) = 3: rows 7, 0, 2; class 1 keeps 1: row 5; class 2 keeps its only cell
    assert confident_rows(predicted, confidence, 0.5).tolist() == [0, 2, 5, 6, 7]
    assert confident_rows(predicted, confidence, 1.0).tolist() == list(range(8))
    # 0.3 of 10 cells is 3 (not the 4 that 0.3 · 10 = 3.0000000000000004 would round up to)
    assert confident_rows(np.zeros(10, np.int64), np.arange(10.0), 0.3).tolist() == [7, 8, 9]


def test_write_store_copies_the_chosen_rows_with_their_labels(stores: dict, tmp_path: Path) -> None:
    ref, query = SentenceStore(stores["ref"]), SentenceStore(stores["query"])
    rows = np.array([0, 3, 17, query.n_cells - 1])
    labels = np.array(["a", "b", "a", "c"], dtype=object)
    ids = np.concatenate([ref.cell_ids(), query.cell_ids()[rows]]).astype(str)
    all_labels = np.concatenate([ref.labels(), labels]).astype(str)
    out = write_store(
        tmp_path / "both.zarr",
        blocks=_packed_rows(ref, query, rows),
        ids=ids,
        labels=all_labels,
        like=ref,
        params={"pseudo_label_fraction": 0.5},
        inputs={"reference": ref.content_hash, "query": query.content_hash},
    )
    both = SentenceStore(out)
    assert both.n_cells == ref.n_cells + 4 and both.panel_hash == ref.panel_hash
    expected = np.concatenate([ref.read_packed(0, ref.n_cells), query.read_packed(0, query.n_cells)[rows]])
    np.testing.assert_array_equal(both.read_packed(0, both.n_cells), expected)  # every chunk's hash checked too
    assert both.labels().tolist() == all_labels.tolist() and both.cell_ids().tolist() == ids.tolist()
    assert both.meta["header"]["inputs"] == {"reference": ref.content_hash, "query": query.content_hash}


@pytest.mark.slow
def test_train_adapt_to_writes_a_self_trained_model(stores: dict, tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = run_cli(
        "train",
        "-s",
        str(stores["ref"]),
        "-p",
        str(stores["panel"]),
        "-o",
        str(out),
        "--adapt-to",
        str(stores["query"]),
        "--pseudo-label-fraction",
        "0.5",
        *TINY_CLI,
    )
    assert result.exit_code == 0, result.stderr
    record = json.loads((out / ADAPTATION).read_text())
    query = SentenceStore(stores["query"])
    assert record["header"]["inputs"]["query"] == query.content_hash
    assert record["of"] == query.n_cells and sum(record["per_type"].values()) == record["pseudo_labelled"]
    assert query.n_cells / 2 <= record["pseudo_labelled"] <= query.n_cells / 2 + len(record["per_type"])
    inspected = run_cli("inspect", str(out))
    assert json.loads(inspected.stdout)["adaptation"]["pseudo_labelled"] == record["pseudo_labelled"]
    params = json.loads(read_metadata(out / "model.safetensors")["header"])["params"]
    assert params["n_train"] == SentenceStore(stores["ref"]).n_cells + record["pseudo_labelled"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no work folder left behind
    predicted = run_cli("predict", "-m", str(out), "-s", str(stores["query"]), "-o", str(tmp_path / "pred"), "-q")
    assert predicted.exit_code == 0, predicted.stderr
    assert "self-trained" not in predicted.stderr  # the query it adapted to
    elsewhere = run_cli("predict", "-m", str(out), "-s", str(stores["ref"]), "-o", str(tmp_path / "pred2"), "-q")
    assert elsewhere.exit_code == 0 and "was self-trained on the query" in elsewhere.stderr


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--pseudo-label-fraction", "0"], "--pseudo-label-fraction"),
        (["--resume"], "--resume"),
    ],
)
def test_bad_self_training_options_are_one_line_exit_2(
    stores: dict, tmp_path: Path, extra: list[str], message: str
) -> None:
    result = run_cli(
        "train",
        "-s",
        str(stores["ref"]),
        "-p",
        str(stores["panel"]),
        "-o",
        str(tmp_path / "m"),
        "--adapt-to",
        str(stores["query"]),
        *extra,
        *TINY_CLI,
    )
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "m").exists()


def test_unlabelled_reference_is_refused_before_training(
    stores: dict, small_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    import anndata as ad

    bare = ad.read_h5ad(small_pair[0])
    del bare.obs["cell_type"]  # no label column: encode keeps no labels
    bare.write_h5ad(tmp_path / "bare.h5ad")
    unlabelled = tmp_path / "unlabelled.zarr"
    assert (
        run_cli(
            "encode", str(tmp_path / "bare.h5ad"), "-p", str(stores["panel"]), "-o", str(unlabelled), "-q"
        ).exit_code
        == 0
    )
    result = run_cli(
        "train",
        "-s",
        str(unlabelled),
        "-p",
        str(stores["panel"]),
        "-o",
        str(tmp_path / "m"),
        "--adapt-to",
        str(stores["query"]),
        *TINY_CLI,
    )
    assert result.exit_code == 2 and "without labels" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.h5ad", "unlabelled.zarr"]  # no model, no work folder
