"""AnnData in, AnnData out: ``fit`` and ``annotate`` in memory, ``write_annotated_h5ad`` on files,
and the result used by scanpy."""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
from conftest import run_cli

from hitanno_cli import artifacts
from hitanno_cli.anndata_io import write_annotated_h5ad
from hitanno_cli.annotation import annotate, fit
from hitanno_cli.errors import UserError
from hitanno_cli.evaluation import evaluate
from hitanno_cli.prediction import predict
from hitanno_cli.predictions import read_majority_voting, read_predictions, read_record
from hitanno_cli.training import recipe_options

TINY = {"embed_dim": 16, "level1_heads": 2, "level1_ff": 16, "level2_heads": 2, "level2_ff": 16, "head_hidden": 8}
OBS = ("hitanno_label", "hitanno_confidence", "hitanno_unassigned")
OBSM = ("X_hitanno", "hitanno_probabilities")


@pytest.fixture(scope="module")
def model(small_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model fitted on the simulated reference AnnData."""
    reference = ad.read_h5ad(small_pair[0])
    options = recipe_options("default", epochs=2, seed=0, model=TINY)
    out = tmp_path_factory.mktemp("fit") / "model"
    assert fit(reference, label_key="cell_type", output=out, options=options, device="cpu") == out
    return out


@pytest.fixture(scope="module")
def predicted(model: Path, small_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The predictions directory of the query, as ``hitanno predict`` writes it."""
    return predict(model, h5ad=small_pair[1], output=tmp_path_factory.mktemp("pred") / "pred", device="cpu")


def check_fields(adata: ad.AnnData, n_cells: int) -> list[str]:
    """Assert the annotation fields are there with the right shapes; return the class names."""
    classes = list(adata.uns["hitanno"]["class_names"])
    assert all(name in adata.obs for name in OBS) and all(name in adata.obsm for name in OBSM)
    label = adata.obs["hitanno_label"]
    assert label.dtype == "category" and list(label.cat.categories) == [*classes, "Unassigned"]
    assert set(label) <= {*classes, "Unassigned"}
    assert adata.obs["hitanno_unassigned"].dtype == bool
    assert adata.obs["hitanno_confidence"].between(0, 1).all()
    assert adata.obsm["X_hitanno"].shape == (n_cells, len(classes)) and adata.obsm["X_hitanno"].dtype == np.float32
    probabilities = adata.obsm["hitanno_probabilities"]
    assert probabilities.shape == (n_cells, len(classes)) and probabilities.dtype == np.float32
    np.testing.assert_allclose(np.exp(adata.obsm["X_hitanno"]), probabilities, atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-4)
    np.testing.assert_allclose(adata.obs["hitanno_confidence"], probabilities.max(1), rtol=1e-6)
    record = adata.uns["hitanno"]
    assert record["model_hash"].startswith("sha256:") and record["hitanno_version"] and "min_confidence" in record
    return classes


def test_fit_then_annotate_adds_the_fields_and_leaves_the_input_alone(model: Path, small_pair: tuple[Path, Path]):
    query = ad.read_h5ad(small_pair[1])
    before = query.copy()
    annotated = annotate(query, model=model, device="cpu")
    assert annotated is not query
    classes = check_fields(annotated, query.n_obs)
    assert set(classes) == set(query.obs["cell_type"])
    assert annotated.uns["hitanno"]["model"] == str(model.resolve())
    assert (annotated.obs["hitanno_label"].astype(str) == query.obs["cell_type"].astype(str)).mean() > 0.5
    assert list(query.obs.columns) == list(before.obs.columns) and not query.obsm and not query.uns
    assert (query.X != before.X).nnz == 0


def test_annotate_in_place_from_a_counts_layer_with_a_threshold(model: Path, small_pair: tuple[Path, Path]):
    query = ad.read_h5ad(small_pair[1])
    query.layers["counts"] = query.X.copy()
    query.X = query.X * 0.5  # not counts: only the layer is
    same = annotate(query, model=model, device="cpu", layer="counts", copy=False, min_confidence=0.99, key_added="ha")
    assert same is query and {"ha_label", "ha_unassigned"} <= set(query.obs) and "X_ha" in query.obsm
    unassigned = query.obs["ha_confidence"] < 0.99
    assert (query.obs["ha_unassigned"] == unassigned).all() and unassigned.any()
    assert (query.obs["ha_label"][unassigned] == "Unassigned").all() and query.uns["ha"]["min_confidence"] == 0.99


def test_annotate_and_fit_refuse_what_they_cannot_use(model: Path, small_pair: tuple[Path, Path], tmp_path: Path):
    with pytest.raises(UserError, match="expected an AnnData, got PosixPath"):
        annotate(small_pair[1], model=model)
    query = ad.read_h5ad(small_pair[1])
    with pytest.raises(UserError, match="not a model directory"):
        annotate(query, model=tmp_path)
    with pytest.raises(UserError, match="no layer 'counts'"):
        annotate(query, model=model, layer="counts")
    query.X = query.X * 0.5
    with pytest.raises(UserError, match="the AnnData has non-integer values") as refused:
        annotate(query, model=model, device="cpu")
    assert "query.h5ad" not in str(refused.value)  # the scratch file is not named
    with pytest.raises(UserError, match="already exists"):
        fit(query, label_key="cell_type", output=model)
    with pytest.raises(UserError, match="label key 'kind' is not a column of obs"):
        fit(query, label_key="kind", output=tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_write_annotated_h5ad_adds_what_annotate_adds(
    model: Path, predicted: Path, small_pair: tuple[Path, Path], tmp_path: Path
):
    query = small_pair[1]
    digest = artifacts.sha256_file(query)
    out = write_annotated_h5ad(query, predictions_dir=predicted, output=tmp_path / "annotated.h5ad")
    assert artifacts.sha256_file(query) == digest
    written = ad.read_h5ad(out)
    check_fields(written, written.n_obs)
    assert written.uns["hitanno"]["query_hash"] == digest
    in_memory = annotate(ad.read_h5ad(query), model=model, device="cpu")
    assert (written.obs["hitanno_label"] == in_memory.obs["hitanno_label"]).all()
    np.testing.assert_allclose(written.obsm["hitanno_probabilities"], in_memory.obsm["hitanno_probabilities"])
    np.testing.assert_allclose(written.obsm["X_hitanno"], in_memory.obsm["X_hitanno"], atol=1e-6)
    assert written.uns["hitanno"]["model_hash"] == in_memory.uns["hitanno"]["model_hash"]
    assert written.obs["cell_type"].equals(in_memory.obs["cell_type"])  # the query's own fields are kept


def test_write_annotated_h5ad_aligns_by_cell_id(predicted: Path, small_pair: tuple[Path, Path], tmp_path: Path):
    query = ad.read_h5ad(small_pair[1])
    order = np.random.default_rng(0).permutation(query.n_obs)
    query[order].write_h5ad(tmp_path / "shuffled.h5ad")
    straight = ad.read_h5ad(write_annotated_h5ad(small_pair[1], predictions_dir=predicted, output=tmp_path / "a.h5ad"))
    shuffled = write_annotated_h5ad(tmp_path / "shuffled.h5ad", predictions_dir=predicted, output=tmp_path / "b.h5ad")
    shuffled = ad.read_h5ad(shuffled)
    assert list(shuffled.obs_names) == list(query.obs_names[order])
    assert (shuffled.obs["hitanno_label"] == straight.obs["hitanno_label"].iloc[order].to_numpy()).all()
    np.testing.assert_array_equal(shuffled.obsm["X_hitanno"], straight.obsm["X_hitanno"][order])


def test_write_annotated_h5ad_refuses_other_cells(predicted: Path, small_pair: tuple[Path, Path], tmp_path: Path):
    query = ad.read_h5ad(small_pair[1])
    query[:-1].write_h5ad(tmp_path / "fewer.h5ad")
    with pytest.raises(UserError, match="0 of its 249 cells have none, 1 predicted cells are not in it"):
        write_annotated_h5ad(tmp_path / "fewer.h5ad", predictions_dir=predicted, output=tmp_path / "out.h5ad")
    query.obs_names = [f"other_{i}" for i in range(query.n_obs)]
    query.write_h5ad(tmp_path / "renamed.h5ad")
    with pytest.raises(UserError, match="250 of its 250 cells have none"):
        write_annotated_h5ad(tmp_path / "renamed.h5ad", predictions_dir=predicted, output=tmp_path / "out.h5ad")
    assert not (tmp_path / "out.h5ad").exists() and not list(tmp_path.glob(".out.h5ad*"))


def test_write_annotated_h5ad_replaces_only_its_own_output(
    predicted: Path, small_pair: tuple[Path, Path], tmp_path: Path
):
    query, out = small_pair[1], tmp_path / "annotated.h5ad"
    write_annotated_h5ad(query, predictions_dir=predicted, output=out)
    first = artifacts.sha256_file(out)
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        write_annotated_h5ad(query, predictions_dir=predicted, output=out)
    assert artifacts.sha256_file(out) == first
    write_annotated_h5ad(query, predictions_dir=predicted, output=out, overwrite=True)
    assert "hitanno" in ad.read_h5ad(out).uns
    with pytest.raises(UserError, match="is not a hitanno-annotated .h5ad"):  # another key: not this kind
        write_annotated_h5ad(query, predictions_dir=predicted, output=out, overwrite=True, key_added="other")
    plain = tmp_path / "plain.h5ad"
    plain.write_bytes(query.read_bytes())
    with pytest.raises(UserError, match="is not a hitanno-annotated .h5ad"):  # a plain .h5ad
        write_annotated_h5ad(query, predictions_dir=predicted, output=plain, overwrite=True)
    assert artifacts.sha256_file(plain) == artifacts.sha256_file(query)
    with pytest.raises(UserError, match="is an input"):
        write_annotated_h5ad(query, predictions_dir=predicted, output=query, overwrite=True)
    with pytest.raises(UserError, match="does not end in .h5ad"):
        write_annotated_h5ad(query, predictions_dir=predicted, output=tmp_path / "annotated.zarr")


@pytest.mark.slow  # numba compiles UMAP and the neighbour search on first use (~7 s)
def test_scanpy_draws_a_umap_of_the_embedding(predicted: Path, small_pair: tuple[Path, Path], tmp_path: Path):
    sc = pytest.importorskip("scanpy")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adata = sc.read_h5ad(write_annotated_h5ad(small_pair[1], predictions_dir=predicted, output=tmp_path / "a.h5ad"))
    sc.pp.neighbors(adata, use_rep="X_hitanno", n_neighbors=10, random_state=0)
    sc.tl.umap(adata, random_state=0)
    assert adata.obsm["X_umap"].shape == (adata.n_obs, 2)
    sc.pl.umap(adata, color="hitanno_label", show=False, save=None)
    plt.savefig(tmp_path / "umap.png")
    plt.close("all")
    assert (tmp_path / "umap.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def voted(model: Path, small_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The predictions of the query with majority voting, at a resolution that gives several clusters."""
    out = tmp_path_factory.mktemp("voted") / "pred"
    return predict(model, h5ad=small_pair[1], output=out, device="cpu", majority_voting=True)


def test_majority_voting_is_written_beside_the_per_cell_labels(predicted: Path, voted: Path) -> None:
    plain, table = read_predictions(predicted / "predictions.csv"), read_predictions(voted / "predictions.csv")
    np.testing.assert_array_equal(table.predicted, plain.predicted)  # the per-cell labels are kept
    vote = read_majority_voting(voted)
    assert vote is not None and read_majority_voting(predicted) is None
    np.testing.assert_array_equal(vote.cell_ids, table.cell_ids)
    assert vote.summary["resolution"] == 5.0 and vote.summary["n_clusters"] == vote.clusters.max() + 1
    for cluster in range(vote.summary["n_clusters"]):
        members = vote.clusters == cluster
        names, counts = np.unique(table.predicted[members], return_counts=True)
        assert set(vote.labels[members]) == {names[counts.argmax()]}  # the cluster's most common label
        assert np.allclose(vote.confidence[members], counts.max() / members.sum(), atol=1e-5)
    header = read_record(voted)["header"]
    assert header["params"]["majority_voting"] == {"resolution": None, "n_neighbors": 15, "seed": 0}


@pytest.mark.slow  # evaluate draws the UMAP, which numba compiles on first use
def test_majority_voting_reaches_anndata_and_evaluate(voted: Path, small_pair: tuple[Path, Path], tmp_path: Path):
    written = ad.read_h5ad(write_annotated_h5ad(small_pair[1], predictions_dir=voted, output=tmp_path / "a.h5ad"))
    vote = read_majority_voting(voted)
    labels = written.obs["hitanno_majority_voting"]
    assert labels.dtype == "category" and list(labels.astype(str)) == list(vote.labels)
    assert written.obs["hitanno_over_clustering"].nunique() == vote.summary["n_clusters"]
    assert written.uns["hitanno"]["majority_voting"]["n_clusters"] == vote.summary["n_clusters"]
    report = tmp_path / "report"
    metrics = evaluate(voted / "predictions.csv", truth=small_pair[1], output=report, label_key="cell_type")
    truth = ad.read_h5ad(small_pair[1]).obs["cell_type"].astype(str).to_numpy()
    assert metrics["majority_voting"]["accuracy"] == pytest.approx((vote.labels == truth).mean())
    assert metrics["header"]["inputs"]["majority_voting"].startswith("sha256:")


def test_an_edited_majority_table_is_refused(voted: Path, small_pair: tuple[Path, Path], tmp_path: Path) -> None:
    copy = tmp_path / "pred"
    shutil.copytree(voted, copy)
    table = copy / "majority_voting.csv"
    table.write_text(table.read_text().replace(",0,", ",1,", 1))
    with pytest.raises(UserError, match="majority_voting.csv is missing, corrupted or was edited"):
        write_annotated_h5ad(small_pair[1], predictions_dir=copy, output=tmp_path / "a.h5ad")
    table.unlink()
    with pytest.raises(UserError, match="missing, corrupted or was edited"):
        read_majority_voting(copy)
    assert not (tmp_path / "a.h5ad").exists()


def test_predict_majority_voting_refuses_bad_settings(model: Path, small_pair: tuple[Path, Path], tmp_path: Path):
    result = run_cli(
        "predict", "-m", str(model), "--h5ad", str(small_pair[1]), "-o", str(tmp_path / "p"),
        "--majority-voting", "--over-clustering-resolution", "0", "-q",
    )  # fmt: skip
    assert result.exit_code == 2 and "--over-clustering-resolution 0 must be positive" in result.stderr
    few = ad.read_h5ad(small_pair[1])[:10].copy()
    few.write_h5ad(tmp_path / "few.h5ad")
    result = run_cli("predict", "-m", str(model), "--h5ad", str(tmp_path / "few.h5ad"), "--majority-voting", "-q")
    assert result.exit_code == 2 and "needs at least 15 cells" in result.stderr
    assert not (tmp_path / "p").exists() and not (tmp_path / "few.predictions").exists()


def test_the_annotated_copy_keeps_the_query_and_can_be_annotated_again(
    predicted: Path, voted: Path, small_pair: tuple[Path, Path], tmp_path: Path
):
    query = ad.read_h5ad(small_pair[1])
    query.layers["counts"] = query.X.copy()
    query.obsm["X_pca"] = np.ones((query.n_obs, 3), dtype=np.float32)
    query.write_h5ad(tmp_path / "query.h5ad", compression="gzip")
    first = write_annotated_h5ad(tmp_path / "query.h5ad", predictions_dir=voted, output=tmp_path / "a.h5ad")
    with h5py.File(first) as handle:
        assert handle["X/data"].compression == "gzip"  # the counts are copied, not rewritten
    again = write_annotated_h5ad(first, predictions_dir=predicted, output=tmp_path / "b.h5ad")
    written = ad.read_h5ad(again)
    assert (written.X != query.X).nnz == 0 and (written.layers["counts"] != query.X).nnz == 0
    np.testing.assert_array_equal(written.obsm["X_pca"], query.obsm["X_pca"])
    check_fields(written, query.n_obs)
    assert "majority_voting" not in written.uns["hitanno"]  # the second predictions had none
    assert written.obs.columns.is_unique
