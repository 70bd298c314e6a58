"""``hitanno evaluate``: metrics against scikit-learn, unseen/Unassigned cells, the report."""

from __future__ import annotations

import base64
import json
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score

from hitanno_cli.evaluation import UNASSIGNED, score

CLASSES = ["B", "T", "NK", "Mono"]


def test_metrics_equal_scikit_learn_on_hand_made_labels() -> None:
    truth = np.array(["B", "B", "T", "T", "T", "NK", "Mono", "Mono", "NK", "B"], dtype=object)
    pred = np.array(["B", "T", "T", "T", "NK", "NK", "Mono", "B", "T", "B"], dtype=object)
    m = score(truth, pred, CLASSES)
    assert m["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(truth, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(f1_score(truth, pred, average="weighted"))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(truth, pred))
    per_f1 = f1_score(truth, pred, average=None, labels=CLASSES)
    assert [m["per_type"][c]["f1"] for c in CLASSES] == pytest.approx(per_f1.tolist())
    assert m["per_type"]["T"]["support"] == 3
    matrix = np.array(m["confusion"]["matrix"])
    assert matrix.sum() == 10 and matrix[m["confusion"]["labels"].index("B"), m["confusion"]["labels"].index("T")] == 1


def test_unseen_types_and_unassigned_are_reported_apart() -> None:
    truth = np.array(["B", "B", "T", "Plasma", "Plasma", "T", "", "B"], dtype=object)
    pred = np.array(["B", UNASSIGNED, "T", "B", UNASSIGNED, "T", "T", "B"], dtype=object)
    m = score(truth, pred, ["B", "T"])
    assert m["n_scored"] == 4 and m["accuracy"] == 1.0  # neither Plasma nor Unassigned counts as an error
    assert m["unseen_types"]["n"] == 2
    assert m["unseen_types"]["by_type"]["Plasma"]["predicted_as"] == {"B": 1, UNASSIGNED: 1}
    assert m["unassigned"] == {"n": 1, "by_true_type": {"B": 1}}
    assert m["n_without_truth"] == 1
    assert m["accuracy_including_unassigned"] == pytest.approx(4 / 5)
    assert "Plasma" not in m["per_type"] and UNASSIGNED not in m["per_type"]


def test_evaluate_cli_writes_metrics_pictures_and_self_contained_html(tmp_path) -> None:
    rng = np.random.default_rng(0)
    truth = rng.choice(CLASSES, size=200)
    pred = np.where(rng.random(200) < 0.8, truth, rng.choice(CLASSES, size=200))
    ids = [f"c{i}" for i in range(200)]
    (tmp_path / "pred").mkdir()
    pd.DataFrame({"cell_id": ids, "predicted": pred, "probability": 0.9}).to_csv(
        tmp_path / "pred" / "predictions.csv", index=False
    )
    obs = pd.DataFrame({"cell_type": truth}, index=ids)
    ad.AnnData(X=np.zeros((200, 3), np.float32), obs=obs).write_h5ad(tmp_path / "q.h5ad")
    out = tmp_path / "report"
    result = run_cli(
        "evaluate",
        "--predictions",
        str(tmp_path / "pred" / "predictions.csv"),
        "--truth",
        str(tmp_path / "q.h5ad"),
        "-l",
        "cell_type",
        "-o",
        str(out),
    )
    assert result.exit_code == 0, result.stderr
    assert "macro_f1" in result.stderr  # the rich summary table
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    assert metrics["header"]["format"] == "hitanno.evaluation"
    page = (out / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert f"{metrics['macro_f1']:.4f}" in page and "http" not in page.replace("http-equiv", "")
    assert (out / "confusion.png").stat().st_size > 1000
    # without -l the one obs column named like a cell type is found, as select-peaks finds it
    found = run_cli(
        "evaluate", "--predictions", str(tmp_path / "pred" / "predictions.csv"), "--truth", str(tmp_path / "q.h5ad"),
        "-o", str(tmp_path / "r1"), "-q",
    )  # fmt: skip
    assert found.exit_code == 0, found.stderr
    assert json.loads((tmp_path / "r1" / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]
    obs["celltype"] = obs["cell_type"]  # two candidates: the user must choose
    ad.AnnData(X=np.zeros((200, 3), np.float32), obs=obs).write_h5ad(tmp_path / "q2.h5ad")
    bad = run_cli(
        "evaluate", "--predictions", str(tmp_path / "pred" / "predictions.csv"), "--truth", str(tmp_path / "q2.h5ad"),
        "-o", str(tmp_path / "r2"),
    )  # fmt: skip
    assert bad.exit_code == 2 and "--label-key" in bad.stderr and not (tmp_path / "r2").exists()


def test_all_unassigned_gives_an_empty_but_valid_score() -> None:
    m = score(np.array(["B", "T"], dtype=object), np.array([UNASSIGNED, UNASSIGNED], dtype=object), ["B", "T"])
    assert m["n_scored"] == 0 and m["accuracy"] is None and m["unassigned"]["n"] == 2


@pytest.mark.slow  # numba compiles UMAP's layout on first use
def test_embedding_map_keeps_separate_groups_apart() -> None:
    """The report's 2-D map (UMAP on exact neighbours) puts two distant groups of cells apart."""
    pytest.importorskip("umap")
    from hitanno_cli.plotting import two_d

    rng = np.random.default_rng(0)
    points = np.vstack([rng.normal(0, 1, (150, 8)), rng.normal(12, 1, (150, 8))]).astype(np.float32)
    coords, method = two_d(points)
    assert method == "UMAP" and coords.shape == (300, 2)
    a, b = coords[:150].mean(0), coords[150:].mean(0)
    spread = max(coords[:150].std(0).max(), coords[150:].std(0).max())
    assert np.linalg.norm(a - b) > 3 * spread


def test_map_caption_says_when_it_shows_a_sample() -> None:
    from hitanno_cli.evaluation import map_caption

    assert map_caption("UMAP", 300, 300) == "UMAP: true and predicted types"
    assert map_caption("UMAP", 30_000, 200_000).endswith("on a seeded sample of 30,000 of the 200,000 cells")
    assert "umap-learn" in map_caption("PCA", 3, 3)
