"""Prediction and explanation: checkpoint round trip, outputs, streaming h5ad, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from conftest import run_cli
from safetensors.torch import load_file, save_file
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from hitanno_cli import console
from hitanno_cli.batches import sequential_batches
from hitanno_cli.checkpoint import load_model, read_metadata, save_model
from hitanno_cli.explanation import AttentionSums, most_predicted
from hitanno_cli.model import HitAnno, ModelConfig
from hitanno_cli.panel import Panel
from hitanno_cli.sentences import SentenceStore
from hitanno_cli.training import recipe_options, train

TINY = {"embed_dim": 16, "level1_heads": 2, "level1_ff": 16, "level2_heads": 2, "level2_ff": 16, "head_hidden": 8}
SMALL = {"embed_dim": 32, "level1_heads": 4, "level1_ff": 32, "level2_heads": 4, "level2_ff": 32, "head_hidden": 16}


@pytest.fixture(scope="module")
def trained(small_pair: tuple[Path, Path], small_panel: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Stores of the small pair and a model trained long enough to learn the types."""
    root = tmp_path_factory.mktemp("trained")
    out = {
        "panel": small_panel,
        "ref": root / "ref.zarr",
        "query": root / "query.zarr",
        "model": root / "model",
        "query_h5ad": small_pair[1],
    }
    for key, data in (("ref", small_pair[0]), ("query", small_pair[1])):
        assert (
            run_cli("encode", str(data), "-p", str(small_panel), "-o", str(out[key]), "-l", "cell_type", "-q").exit_code
            == 0
        )
    console.set_quiet(True)
    # the default recipe (with its linear path) learns these types at every seed; the
    # published transformer alone, on 450 cells and a few epochs, sometimes does not
    options = recipe_options("default", batch_size=16, model=dict(SMALL))
    train(out["ref"], panel=small_panel, output=out["model"], options=options, device="cpu")
    return out


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_save_load_gives_identical_predictions(trained: dict, tmp_path: Path) -> None:
    panel = Panel.load(trained["panel"])
    store = SentenceStore(trained["query"])
    torch.manual_seed(3)
    model = HitAnno(ModelConfig(n_types=panel.n_types, peaks_per_type=panel.peaks_per_type, **TINY)).eval()
    save_model(
        tmp_path,
        model=model,
        config=model.config,
        class_names=panel.cell_types,
        panel=panel,
        params={"note": "test"},
        inputs={},
    )
    loaded = load_model(tmp_path)
    batch = next(sequential_batches(store, None, 64))
    args = (torch.from_numpy(batch.open.indptr), torch.from_numpy(batch.open.positions))
    with torch.no_grad():
        before, after = model(*args), loaded.model(*args)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.embedding, after.embedding)
    assert loaded.class_names == panel.cell_types and loaded.config == model.config


def test_predict_writes_labels_probabilities_and_embeddings(trained: dict, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    result = run_cli(
        "predict",
        "-m",
        str(trained["model"]),
        "-s",
        str(trained["query"]),
        "-o",
        str(out),
        "-q",
        "--batch-size",
        "37",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.stderr
    rows = _rows(out / "predictions.csv")
    store = SentenceStore(trained["query"])
    assert [r["cell_id"] for r in rows] == store.cell_ids().tolist()
    probs = zarr.open_group(out / "probabilities.zarr", mode="r")
    matrix = probs["probabilities"][:]
    assert matrix.shape == (store.n_cells, len(store.cell_types))
    assert np.allclose(matrix.sum(1), 1, atol=1e-5)
    names = probs.attrs["hitanno"]["class_names"]
    assert [r["predicted"] for r in rows] == [names[i] for i in matrix.argmax(1)]
    assert np.allclose([float(r["probability"]) for r in rows], matrix.max(1), rtol=1e-5)
    emb = zarr.open_group(out / "embeddings.zarr", mode="r")["embeddings"][:]
    assert emb.shape == matrix.shape and np.isfinite(emb).all()
    assert np.allclose(np.exp(emb), matrix, atol=1e-5)  # each cell's log-probabilities
    truth = [r["true_label"] for r in rows]
    accuracy = np.mean([r["predicted"] == t for r, t in zip(rows, truth)])
    majority = pd.Series(truth).value_counts(normalize=True).iloc[0]
    assert accuracy > majority + 0.1  # it learned the types, not just the largest one
    # the embedding is a representation where cells of one type are neighbours
    neighbours = cross_val_score(KNeighborsClassifier(5), emb, truth, cv=3).mean()
    assert neighbours > majority + 0.1 and neighbours > accuracy - 0.1


def test_h5ad_query_is_encoded_on_the_fly_to_the_same_result(trained: dict, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert (
        run_cli(
            "predict", "-m", str(trained["model"]), "-s", str(trained["query"]), "-o", str(a), "-q", "--device", "cpu"
        ).exit_code
        == 0
    )
    result = run_cli(
        "predict",
        "-m",
        str(trained["model"]),
        "--h5ad",
        str(trained["query_h5ad"]),
        "-l",
        "cell_type",
        "-o",
        str(b),
        "-q",
        "--batch-size",
        "50",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.stderr
    assert _rows(a / "predictions.csv") == _rows(b / "predictions.csv")


def test_min_confidence_marks_unassigned(trained: dict, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    assert (
        run_cli(
            "predict",
            "-m",
            str(trained["model"]),
            "-s",
            str(trained["query"]),
            "-o",
            str(out),
            "-q",
            "--min-confidence",
            "0.9",
            "--device",
            "cpu",
        ).exit_code
        == 0
    )
    rows = _rows(out / "predictions.csv")
    low = [r for r in rows if float(r["probability"]) < 0.9]
    assert low and all(r["predicted"] == "Unassigned" for r in low)
    assert all(r["predicted"] != "Unassigned" for r in rows if float(r["probability"]) >= 0.9)


def test_explain_writes_attention_tables_and_heatmaps(trained: dict, tmp_path: Path) -> None:
    out = tmp_path / "attention"
    result = run_cli(
        "explain",
        "-m",
        str(trained["model"]),
        "-s",
        str(trained["query"]),
        "-o",
        str(out),
        "-q",
        "--top-peaks",
        "5",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["cells_per_predicted_type"]
    assert sum(counts.values()) == SentenceStore(trained["query"]).n_cells
    top = pd.read_csv(out / "level1_top_peaks.csv")
    n_types = len(counts)
    assert len(top) == sum(1 for n in counts.values() if n) * n_types * 5
    assert top.groupby(["predicted_type", "peak_set"])["attention"].apply(lambda s: s.is_monotonic_decreasing).all()
    assert top["chrom"].notna().all() and (top["end"] > top["start"]).all()
    cls = pd.read_csv(out / "level2_cls.csv")
    assert np.allclose(cls.iloc[:, 2:].sum(1), 1, atol=1e-4)  # CLS's attention row sums to 1
    assert (out / "level2_cls.png").stat().st_size > 1000 and (out / "level2_heatmaps.png").stat().st_size > 1000


def test_attention_sums_per_predicted_type_equal_a_loop() -> None:
    rng = np.random.default_rng(0)
    sums = AttentionSums(n_types=3, peaks_per_type=4)
    batches = [(rng.integers(0, 3, n), rng.random((n, 3, 4)), rng.random((n, 4, 4))) for n in (5, 1, 9)]
    for predicted, level1, level2 in batches:
        sums.add(predicted, level1, level2)
    predicted = np.concatenate([b[0] for b in batches])
    level1, level2 = np.concatenate([b[1] for b in batches]), np.concatenate([b[2] for b in batches])
    for c in range(3):
        np.testing.assert_allclose(sums.level1[c], level1[predicted == c].sum(0), rtol=1e-12)
        np.testing.assert_allclose(sums.level2[c], level2[predicted == c].sum(0), rtol=1e-12)
    assert sums.cells.tolist() == np.bincount(predicted, minlength=3).tolist()


def test_heatmaps_show_the_most_predicted_types_only() -> None:
    cells = np.array([0, 5, 9, 5, 1, 0, 30])
    assert most_predicted(cells, 3).tolist() == [6, 2, 1]  # 1 and 3 tie at 5: panel order
    assert most_predicted(cells, 16).tolist() == [6, 2, 1, 3, 4]  # never a type no cell was predicted as


# -- bad input ----------------------------------------------------------------------------------
def test_predict_refuses_a_store_of_another_panel(trained: dict, small_pair: tuple[Path, Path], tmp_path: Path) -> None:
    other, store = tmp_path / "other.json", tmp_path / "other.zarr"
    assert (
        run_cli(
            "select-peaks", str(small_pair[0]), "-l", "cell_type", "-o", str(other), "--peaks-per-type", "30", "-q"
        ).exit_code
        == 0
    )
    assert run_cli("encode", str(small_pair[1]), "-p", str(other), "-o", str(store), "-q").exit_code == 0
    for command in ("predict", "explain"):
        result = run_cli(command, "-m", str(trained["model"]), "-s", str(store), "-o", str(tmp_path / command), "-q")
        assert result.exit_code == 2 and "another panel" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / command).exists()


def test_model_from_a_newer_format_is_refused(trained: dict, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    meta = read_metadata(trained["model"] / "model.safetensors")
    header = json.loads(meta["header"])
    meta["header"] = json.dumps(dict(header, format_version="2.0"))
    save_file(load_file(trained["model"] / "model.safetensors"), model / "model.safetensors", metadata=meta)
    (model / "panel.json").write_text((trained["model"] / "panel.json").read_text())
    result = run_cli("predict", "-m", str(model), "-s", str(trained["query"]), "-o", str(tmp_path / "p"), "-q")
    assert result.exit_code == 2 and "newer" in result.stderr and "upgrade hitanno" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_model_with_a_swapped_panel_is_refused(trained: dict, small_pair: tuple[Path, Path], tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes((trained["model"] / "model.safetensors").read_bytes())
    assert (
        run_cli(
            "select-peaks",
            str(small_pair[0]),
            "-l",
            "cell_type",
            "-o",
            str(model / "panel.json"),
            "--peaks-per-type",
            "30",
            "-q",
        ).exit_code
        == 0
    )
    result = run_cli("predict", "-m", str(model), "-s", str(trained["query"]), "-o", str(tmp_path / "p"), "-q")
    assert result.exit_code == 2 and "not the panel" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "exactly one query"),
        (["--min-confidence", "1.5"], "not a probability"),
    ],
)
def test_predict_option_errors(trained: dict, tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli(
        "predict",
        "-m",
        str(trained["model"]),
        "-o",
        str(tmp_path / "p"),
        "-q",
        *args,
        *(["-s", str(trained["query"])] if args else []),
    )
    assert result.exit_code == 2 and message in result.stderr


def test_missing_model_and_existing_output_are_refused(trained: dict, tmp_path: Path) -> None:
    result = run_cli("predict", "-m", str(tmp_path / "none"), "-s", str(trained["query"]), "-o", str(tmp_path / "p"))
    assert result.exit_code == 2 and "model.safetensors" in result.stderr
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "mine.txt").write_text("not empty")
    result = run_cli(
        "predict", "-m", str(trained["model"]), "-s", str(trained["query"]), "-o", str(tmp_path / "exists")
    )
    assert result.exit_code == 2 and "--overwrite" in result.stderr


def test_every_artifact_kind_is_told_apart(trained: dict, tmp_path: Path) -> None:
    from hitanno_cli import artifacts

    pred = tmp_path / "pred"
    assert (
        run_cli("predict", "-m", str(trained["model"]), "-s", str(trained["query"]), "-o", str(pred), "-q").exit_code
        == 0
    )
    kinds = {
        trained["panel"]: artifacts.PANEL,
        trained["query"]: artifacts.SENTENCES,
        trained["model"]: artifacts.MODEL,
        trained["model"] / "model.safetensors": artifacts.MODEL,
        pred: artifacts.PREDICTIONS,
        pred / "predictions.csv": artifacts.PREDICTIONS,
        pred / "embeddings.zarr": artifacts.PREDICTIONS,
        trained["query_h5ad"]: None,
        tmp_path / "absent": None,
    }
    assert {path: artifacts.kind_of(path) for path in kinds} == kinds
    (tmp_path / "other.json").write_text('{"header": {"no": "format"}}')
    assert artifacts.kind_of(tmp_path / "other.json") is None
