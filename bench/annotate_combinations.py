"""Combinations of hitanno with the tuned linear model, from one ``bench/annotate.py`` run.

Reads the work folder that ``bench/annotate.py --seeds S1,S2,S3 --self-train`` leaves
(per setting: the split's ``ref.h5ad`` / ``query.h5ad`` and every seed's predictions,
plain and self-trained) and scores, per setting, without training anything again:

* **blend**: ``(1 − w) · p_hitanno + w · p_linear``, where ``p_linear`` is the
  probability of the logistic-regression part of the CV-tuned linear grid
  (``bench/baselines.py``; the SVMs give no probabilities), chosen by the same 3-fold CV
  on the reference; mean ± sd over seeds for each weight ``w``;
* **seed ensemble**: the mean of the seeds' probabilities, one ensemble per method;
* **embedding neighbours**: how well cell types form neighbourhoods in what ``predict``
  wrote to ``embeddings.zarr`` (plain runs), against the query's own LSI: macro-F1 of a
  15-NN classifier on it, 5-fold CV with the true labels;
* **ceiling** (with ``--ceiling``): the tuned logistic regression scored by 10-fold CV
  over *every* cell of the setting's data set (query labels included), per type: what a
  linear model of these features reaches at best, and which types it cannot separate.

    python bench/annotate_combinations.py [--work bench/_work/annotate] [--ceiling]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import TruncatedSVD
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import normalize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from annotate import ROOT, tag  # noqa: E402
from baselines import LINEAR_GRID, BinaryTfidf  # noqa: E402

from hitanno_cli.predictions import read_array, read_predictions  # noqa: E402

WEIGHTS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)
#: The logistic-regression part of the tuned linear grid (the SVMs give no probabilities).
LR_GRID = {name: make for name, make, l2 in LINEAR_GRID if not l2}


def macro_f1(truth: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> float:
    """Macro-F1 over the true types of the argmax of ``probabilities``."""
    predicted = np.asarray(classes, dtype=object)[probabilities.argmax(1)]
    return float(f1_score(truth, predicted, labels=sorted(set(truth)), average="macro", zero_division=0))


def tuned_lr(x_ref: sp.csr_matrix, labels: np.ndarray) -> tuple[LogisticRegression, dict[str, Any]]:
    """The LR configuration with the best 3-fold CV macro-F1 on the reference, refitted."""
    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=0)
    cv = {
        name: float(f1_score(labels, cross_val_predict(make(), x_ref, labels, cv=folds), average="macro"))
        for name, make in LR_GRID.items()
    }
    best = max(cv, key=cv.get)
    return LR_GRID[best]().fit(x_ref, labels), {"chosen": best, "cv_macro_f1": round(cv[best], 4)}


def hitanno_probabilities(work: Path, seed: int, self_train: bool, classes: list[str]) -> np.ndarray:
    """One run's query probabilities, columns in ``classes`` order."""
    directory = work / f"pred_{tag(seed, self_train)}"
    table = read_predictions(directory / "predictions.csv")
    _, matrix = read_array(directory, "probabilities")
    return matrix[:, [table.class_names.index(name) for name in classes]]


def mean_sd(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(float(np.mean(values)), 4),
        "sd": round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else 0.0,
    }


def neighbour_f1(representation: np.ndarray, truth: np.ndarray) -> float:
    """Macro-F1 of a 15-NN classifier on ``representation``, 5-fold CV with the true labels."""
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    guess = cross_val_predict(KNeighborsClassifier(n_neighbors=15), representation, truth, cv=folds)
    return round(float(f1_score(truth, guess, average="macro")), 4)


def query_lsi(query: ad.AnnData) -> np.ndarray:
    """The query's own LSI: binary TF-IDF, 31-component SVD, first dropped, L2 rows."""
    counts = query.X.tocsr()
    x = BinaryTfidf().fit(counts).transform(counts)
    return normalize(TruncatedSVD(n_components=31, random_state=0).fit_transform(x)[:, 1:])


def embedding_neighbours(work: Path, seeds: list[int], query: ad.AnnData, truth: np.ndarray) -> dict[str, Any]:
    """Neighbour macro-F1 of each plain run's ``embeddings.zarr``, and of the query's LSI."""
    runs = []
    for seed in seeds:
        directory = work / f"pred_{tag(seed)}"
        ids, matrix = read_array(directory, "embeddings")
        if list(ids) != list(query.obs_names):
            raise SystemExit(f"{directory}: the embeddings are not in the query's cell order")
        runs.append(neighbour_f1(matrix, truth))
    return {
        "embeddings": mean_sd(runs),
        "width": int(matrix.shape[1]),
        "query_lsi": neighbour_f1(query_lsi(query), truth),
    }


def ceiling(adata: ad.AnnData, model_args: dict[str, Any]) -> dict[str, Any]:
    """The tuned LR's 10-fold CV over every cell of the data set: macro-F1 and per-type F1."""
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    counts = adata.X.tocsr()
    x = BinaryTfidf().fit(counts).transform(counts)  # idf over all cells: the ceiling may look at them
    model = LR_GRID[model_args["chosen"]]()
    guess = cross_val_predict(model, x, labels, cv=StratifiedKFold(n_splits=10, shuffle=True, random_state=0))
    types = sorted(set(labels))
    per_type = f1_score(labels, guess, labels=types, average=None)
    return {
        "macro_f1": round(float(per_type.mean()), 4),
        "per_type": {t: round(float(f), 3) for t, f in zip(types, per_type)},
    }


def run_setting(work: Path, seeds: list[int], with_ceiling: bool) -> dict[str, Any]:
    ref, query = ad.read_h5ad(work / "ref.h5ad"), ad.read_h5ad(work / "query.h5ad")
    labels, truth = ref.obs["cell_type"].astype(str).to_numpy(), query.obs["cell_type"].astype(str).to_numpy()
    tfidf = BinaryTfidf().fit(ref.X.tocsr())
    model, chosen = tuned_lr(tfidf.transform(ref.X.tocsr()), labels)
    classes = [str(c) for c in model.classes_]
    linear = model.predict_proba(tfidf.transform(query.X.tocsr()))
    report: dict[str, Any] = {"tuned_lr": {**chosen, "macro_f1": round(macro_f1(truth, linear, classes), 4)}}
    for self_train in (False, True):
        method = "hitanno + self-training" if self_train else "hitanno"
        runs = [hitanno_probabilities(work, seed, self_train, classes) for seed in seeds]
        report[method] = {
            "blend": {
                str(w): mean_sd([macro_f1(truth, (1 - w) * p + w * linear, classes) for p in runs]) for w in WEIGHTS
            },
            "seed_ensemble": round(macro_f1(truth, np.mean(runs, axis=0), classes), 4),
        }
    report["embedding_neighbours"] = embedding_neighbours(work, seeds, query, truth)
    if with_ceiling:
        report["ceiling"] = ceiling(ad.concat([ref, query]), chosen)
    return report


def print_setting(name: str, report: dict[str, Any]) -> None:
    lr = report["tuned_lr"]
    print(f"\n== {name}: tuned LR ({lr['chosen']}) macro-F1 {lr['macro_f1']:.3f}")
    print("blend weight of the LR   " + "".join(f"{w:>14}" for w in WEIGHTS) + "  seed ensemble")
    for method in ("hitanno", "hitanno + self-training"):
        cells = "".join(f"{b['mean']:>8.3f}±{b['sd']:.3f}" for b in report[method]["blend"].values())
        print(f"{method:24s} {cells}  {report[method]['seed_ensemble']:>13.3f}")
    n = report["embedding_neighbours"]
    print(
        f"15-NN macro-F1 in predict's embeddings ({n['width']} wide): {n['embeddings']['mean']:.3f} "
        f"± {n['embeddings']['sd']:.3f}; in the query's LSI: {n['query_lsi']:.3f}"
    )
    if "ceiling" in report:
        c = report["ceiling"]
        worst = sorted(c["per_type"].items(), key=lambda kv: kv[1])[:4]
        print(
            f"ceiling (10-fold CV, every cell): {c['macro_f1']:.3f}; lowest types "
            + ", ".join(f"{t} {f:.2f}" for t, f in worst)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "annotate")
    parser.add_argument("--settings", default="cross-donor,intra,small")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--ceiling", action="store_true", help="also the tuned LR's 10-fold CV over every cell")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "annotate_combinations.json")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = [s for s in args.settings.split(",") if s]
    missing = [s for s in settings if not (args.work / s / "query.h5ad").exists()]
    if missing:
        raise SystemExit(
            f"no bench/annotate.py work folder for {missing} under {args.work}: run it with --self-train first"
        )
    report = {name: run_setting(args.work / name, seeds, args.ceiling) for name in settings}
    for name, setting in report.items():
        print_setting(name, setting)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"work": str(args.work), "seeds": seeds, "settings": report}, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
