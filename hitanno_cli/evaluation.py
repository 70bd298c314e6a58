"""Scoring predictions against known labels (SPEC §1.6), with scikit-learn's metrics.

Cells whose true type the reference never had ("unseen") and cells left ``Unassigned``
are reported apart: neither silently counts as an error of a known type. The headline
metrics score the cells that have a known true type and an assigned prediction;
``accuracy_including_unassigned`` also counts ``Unassigned`` cells of known types as
wrong, for a coverage-aware figure.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from hitanno_cli import artifacts
from hitanno_cli.errors import UserError

UNASSIGNED = artifacts.UNASSIGNED
HEADLINE = ("accuracy", "macro_f1", "weighted_f1", "kappa", "accuracy_including_unassigned")


@dataclass
class Predictions:
    """What ``predict`` wrote: per-cell labels, the model's classes, and the folder."""

    cell_ids: np.ndarray
    predicted: np.ndarray
    probability: np.ndarray
    class_names: list[str]
    directory: Path


def read_predictions(path: str | Path) -> Predictions:
    """Read ``predictions.csv`` and the class names stored beside it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"predictions file {path} does not exist", "pass the predictions.csv written by hitanno predict")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"cell_id", "predicted"} <= set(rows[0]):
        raise UserError(f"{path} is not a hitanno predictions.csv (needs cell_id and predicted columns)",
                        "pass the predictions.csv written by hitanno predict")
    ids = np.array([r["cell_id"] for r in rows], dtype=object)
    predicted = np.array([r["predicted"] for r in rows], dtype=object)
    probability = np.array([float(r.get("probability") or "nan") for r in rows])
    classes = _class_names(path.parent) or sorted(set(predicted) - {UNASSIGNED})
    return Predictions(ids, predicted, probability, classes, path.parent)


def _class_names(directory: Path) -> list[str] | None:
    store = directory / "probabilities.zarr"
    if not (store / "zarr.json").is_file():
        return None
    meta = dict(zarr.open_group(store, mode="r").attrs).get("hitanno", {})
    return list(meta.get("class_names") or []) or None


def align_truth(cell_ids: np.ndarray, truth_ids: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """True label of each predicted cell (``""`` where unknown), matched by cell id."""
    lookup = dict(zip(truth_ids.tolist(), truth.tolist()))
    missing = [c for c in cell_ids.tolist() if c not in lookup]
    if len(missing) == len(cell_ids):
        raise UserError("no predicted cell id is in the truth", "pass the query the predictions were made for")
    return np.array([lookup.get(c) or "" for c in cell_ids.tolist()], dtype=object)


def score(truth: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """All metrics of ``metrics.json`` for aligned truth/prediction vectors."""
    truth, predicted = np.asarray(truth, dtype=object), np.asarray(predicted, dtype=object)
    has_truth = truth != ""
    known = has_truth & np.isin(truth, classes)
    unseen = has_truth & ~known
    unassigned = known & (predicted == UNASSIGNED)
    scored = known & ~unassigned
    out: dict[str, Any] = {
        "n_cells": int(len(truth)),
        "n_without_truth": int((~has_truth).sum()),
        "n_scored": int(scored.sum()),
        "unseen_types": _breakdown(truth[unseen], predicted[unseen]),
        "unassigned": {"n": int(unassigned.sum()), "by_true_type": dict(Counter(truth[unassigned].tolist()))},
    }
    if not scored.any():  # e.g. every cell Unassigned: a valid, if empty, result
        out.update({key: None for key in HEADLINE}, per_type={},
                   confusion={"labels": [], "rows": "true", "columns": "predicted", "matrix": []})
        return out
    y, p = truth[scored].astype(str), predicted[scored].astype(str)
    labels = [c for c in classes if c in set(y) | set(p)]
    precision, recall, f1, support = precision_recall_fscore_support(y, p, labels=labels, zero_division=0)
    out.update(
        accuracy=float(accuracy_score(y, p)),
        macro_f1=float(f1_score(y, p, average="macro", labels=labels, zero_division=0)),
        weighted_f1=float(f1_score(y, p, average="weighted", labels=labels, zero_division=0)),
        kappa=float(cohen_kappa_score(y, p)),
        accuracy_including_unassigned=float((truth[known] == predicted[known]).mean()),
        per_type={
            name: {"precision": float(pr), "recall": float(rc), "f1": float(f), "support": int(s)}
            for name, pr, rc, f, s in zip(labels, precision, recall, f1, support)
        },
        confusion={"labels": labels, "rows": "true", "columns": "predicted",
                   "matrix": confusion_matrix(y, p, labels=labels).tolist()},
    )
    return out


def _breakdown(truth: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """For unseen types: how many cells, and what they were called."""
    by_type = {
        name: {"n": int((truth == name).sum()), "predicted_as": dict(Counter(predicted[truth == name].tolist()))}
        for name in sorted(set(truth.tolist()))
    }
    return {"n": int(len(truth)), "by_type": by_type}


def read_truth(path: str | Path, label_key: str | None) -> tuple[np.ndarray, np.ndarray]:
    """``(cell_ids, labels)`` from a labelled sentence store or an ``.h5ad``."""
    path = Path(path)
    if (path / "zarr.json").is_file():
        from hitanno_cli.sentences import SentenceStore

        store = SentenceStore(path)
        labels = store.labels()
        if labels is None:
            raise UserError(f"{path} was encoded without labels", "pass the query .h5ad with --label-key, or re-encode with -l")
        return store.cell_ids(), labels
    if label_key is None:
        raise UserError("--truth is an .h5ad but no --label-key was given", "pass --label-key with the obs column of true types")
    from hitanno_cli.h5ad import H5ad

    with H5ad(path) as h5:
        labels = np.array(["" if v is None else v for v in h5.labels(label_key)], dtype=object)
        return h5.obs_names().astype(object), labels


def read_embeddings(directory: Path, cell_ids: np.ndarray) -> np.ndarray | None:
    """The cell embeddings ``predict`` wrote beside the predictions, row-aligned; None if absent."""
    store = directory / "embeddings.zarr"
    if not (store / "zarr.json").is_file():
        return None
    group = zarr.open_group(store, mode="r")
    ids = group["cell_ids"][:].astype(object)
    if len(ids) != len(cell_ids) or not np.array_equal(ids, cell_ids):
        return None
    return np.asarray(group["embeddings"][:], dtype=np.float32)


#: Cells drawn for the 2-D map (it is a picture: more would only slow it down).
MAP_CELLS = 30_000


def evaluate(predictions: Path, truth: Path, label_key: str | None, out: Path,
             overwrite: bool = False, embedding_map: bool = True) -> dict[str, Any]:
    """Score ``predictions`` against ``truth`` and write ``out/`` (metrics, PNGs, report.html)."""
    from hitanno_cli import report  # matplotlib: imported only when pictures are drawn

    preds = read_predictions(predictions)
    truth_ids, truth_labels = read_truth(truth, label_key)
    truth_aligned = align_truth(preds.cell_ids, truth_ids, truth_labels)
    metrics = score(truth_aligned, preds.predicted, preds.class_names)
    inputs = {"predictions": artifacts.sha256_file(predictions), "truth": _identity(truth)}
    metrics = {"header": artifacts.make_header(artifacts.EVALUATION, {"label_key": label_key}, inputs), **metrics}
    with artifacts.atomic_dir(out, overwrite) as tmp:
        images = []
        if metrics["per_type"]:
            images += [(report.confusion_heatmap(metrics, tmp / "confusion.png"), "Confusion matrix, row-normalised"),
                       (report.f1_bars(metrics, tmp / "f1_per_type.png"), "Per-type F1, ordered by type size")]
        embeddings = read_embeddings(preds.directory, preds.cell_ids) if embedding_map else None
        if embeddings is not None:
            pick = np.random.default_rng(0).permutation(len(embeddings))[:MAP_CELLS]
            coords, method = report.two_d(embeddings[pick])
            metrics["embedding_map"] = method
            images.append((report.embedding_map(coords, truth_aligned[pick], preds.predicted[pick], method,
                                                tmp / "embedding_map.png"), f"{method}: true and predicted types"))
        artifacts.write_json(tmp / "metrics.json", metrics)
        report.write_html(metrics, images, tmp / "report.html", f"hitanno evaluation: {predictions}")
    return metrics


def _identity(path: Path) -> str:
    if (path / "zarr.json").is_file():
        from hitanno_cli.sentences import SentenceStore

        return SentenceStore(path).content_hash
    return artifacts.sha256_file(path)
