"""``evaluate``: scoring predictions against known labels, with scikit-learn's metrics.

Cells whose true type the reference never had ("unseen") and cells left ``Unassigned``
are reported apart: neither silently counts as an error of a known type. The headline
metrics score the cells that have a known true type and an assigned prediction;
``accuracy_including_unassigned`` also counts ``Unassigned`` cells of known types as
wrong, for a coverage-aware figure. Predictions made with ``--majority-voting`` are also
scored by their majority labels, under ``majority_voting`` (the same headline metrics).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from hitanno_cli import artifacts, outputs
from hitanno_cli.errors import UserError
from hitanno_cli.predictions import UNASSIGNED, read_embeddings, read_majority_voting, read_predictions

#: The metrics a summary shows first.
HEADLINE = ("accuracy", "macro_f1", "weighted_f1", "kappa", "accuracy_including_unassigned")


def align_truth(cell_ids: np.ndarray, truth_ids: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """True label of each predicted cell (``""`` where unknown), matched by cell id.

    Ids must be unique on both sides: a repeated id would pair cells with another cell's truth.
    """
    for ids, side in ((cell_ids, "the predictions"), (truth_ids, "the truth")):
        if len(set(ids.tolist())) != len(ids):
            first = next(c for c, n in Counter(ids.tolist()).items() if n > 1)
            raise UserError(f"{side} repeat cell id '{first}'", "give every cell a unique id and predict again")
    lookup = dict(zip(truth_ids.tolist(), truth.tolist(), strict=True))
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
        out.update(
            {key: None for key in HEADLINE},
            per_type={},
            confusion={"labels": [], "rows": "true", "columns": "predicted", "matrix": []},
        )
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
        confusion={
            "labels": labels,
            "rows": "true",
            "columns": "predicted",
            "matrix": confusion_matrix(y, p, labels=labels).tolist(),
        },
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
    """``(cell_ids, labels)`` from a labelled sentence store or an ``.h5ad`` (its ``label_key``
    column; None: the one column with a usual cell-type name, as ``select-peaks`` finds it)."""
    path = Path(path)
    if artifacts.kind_of(path) == artifacts.SENTENCES:
        from hitanno_cli.sentences import SentenceStore

        store = SentenceStore(path)
        labels = store.labels()
        if labels is None:
            raise UserError(
                f"{path} was encoded without labels", "pass the query .h5ad with --label-key, or re-encode with -l"
            )
        return store.cell_ids(), labels
    from hitanno_cli.h5ad import H5ad

    with H5ad(path) as h5:
        labels = np.array(["" if v is None else v for v in h5.labels(h5.label_key(label_key))], dtype=object)
        return h5.unique_obs_names().astype(object), labels


#: Cells drawn for the 2-D map (it is a picture: more would only slow it down).
MAP_CELLS = 30_000


def evaluate(
    predictions: str | Path,
    *,
    truth: str | Path,
    output: str | Path,
    label_key: str | None = None,
    embedding_map: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Score ``predictions`` against ``truth``; write the report directory ``output``
    (metrics.json, pictures, report.html) and return the metrics."""
    inputs = [predictions, truth]
    with outputs.writing(output, kind=artifacts.EVALUATION, overwrite=overwrite, inputs=inputs) as out:
        return _evaluate(Path(predictions), Path(truth), out, label_key=label_key, embedding_map=embedding_map)


def _evaluate(
    predictions: Path, truth: Path, out: Path, *, label_key: str | None, embedding_map: bool
) -> dict[str, Any]:
    from hitanno_cli import report  # matplotlib: imported only when pictures are drawn
    from hitanno_cli.plotting import two_d

    preds = read_predictions(predictions)
    truth_ids, truth_labels = read_truth(truth, label_key)
    truth_aligned = align_truth(preds.cell_ids, truth_ids, truth_labels)
    metrics = score(truth_aligned, preds.predicted, preds.class_names)
    inputs = {"predictions": artifacts.sha256_file(predictions), "truth": _identity(truth)}
    vote = read_majority_voting(preds.directory)
    if vote is not None:
        if not np.array_equal(vote.cell_ids, preds.cell_ids):
            raise UserError(f"{preds.directory}: the majority voting is for other cells", "run hitanno predict again")
        voted = score(truth_aligned, vote.labels, preds.class_names)
        metrics["majority_voting"] = {**{key: voted[key] for key in HEADLINE}, **vote.summary}
        inputs["majority_voting"] = vote.content_hash
    metrics = {"header": artifacts.make_header(artifacts.EVALUATION, {"label_key": label_key}, inputs), **metrics}
    with artifacts.atomic_dir(out, overwrite=True) as tmp:
        images = []
        if metrics["per_type"]:
            images += [
                (report.confusion_heatmap(metrics, tmp / "confusion.png"), "Confusion matrix, row-normalised"),
                (report.f1_bars(metrics, tmp / "f1_per_type.png"), "Per-type F1, ordered by type size"),
            ]
        embeddings = read_embeddings(preds.directory, preds.cell_ids) if embedding_map else None
        if embeddings is not None:
            pick = np.random.default_rng(0).permutation(len(embeddings))[:MAP_CELLS]
            coords, method = two_d(embeddings[pick])
            metrics["embedding_map"], metrics["embedding_map_cells"] = method, len(pick)
            picture = report.embedding_map(
                coords, truth_aligned[pick], preds.predicted[pick], method, tmp / "embedding_map.png"
            )
            images.append((picture, map_caption(method, len(pick), len(embeddings))))
        artifacts.write_verified_json(tmp / "metrics.json", metrics)
        report.write_html(
            metrics, images, tmp / "report.html", title=f"hitanno evaluation: {predictions}", headline=HEADLINE
        )
    return metrics


def map_caption(method: str, shown: int, total: int) -> str:
    """What the embedding map shows: its method, and the sample when it is not every cell."""
    caption = f"{method}: true and predicted types"
    if method != "UMAP":
        caption += " (PCA: too few cells for UMAP, or umap-learn is not installed)"
    if shown < total:
        caption += f", on a seeded sample of {shown:,} of the {total:,} cells"
    return caption


def _identity(path: Path) -> str:
    """The content hash of the truth: a store's own, else the file's."""
    if artifacts.kind_of(path) == artifacts.SENTENCES:
        from hitanno_cli.sentences import SentenceStore

        return SentenceStore(path).content_hash
    return artifacts.sha256_file(path)
