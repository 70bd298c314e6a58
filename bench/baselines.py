"""Annotation baselines and scores, as the benchmark settings define them (scikit-learn).

* TF-IDF + logistic regression: the published TF-IDF (``log(1 + 1e4 · tf · idf)``) on
  *binarised* counts, idf from the reference; ``LogisticRegression(C=1)``.
* LSI + kNN (the usual label transfer): 50-component truncated SVD of that TF-IDF,
  first component dropped, rows L2-normalised; ``KNeighborsClassifier(k=15)``.
* CV-tuned linear, what an analyst does in ten lines: on that TF-IDF, a grid of logistic
  regression (C ∈ {0.3, 1, 3}, class weights none / balanced, raw rows) and linear SVM
  (C ∈ {0.1, 0.3, 1}, none / balanced, L2-normalised rows); the configuration with the
  best 3-fold stratified cross-validated macro-F1 *on the reference alone* is refitted on
  the whole reference and predicts the query.
* Self-trained LR: logistic regression (C=1) on the reference predicts the query; the
  most confident 30 % of each predicted type are pseudo-labelled, and the model is refitted
  on the reference plus those cells.

Reusable: ``from baselines import run_baselines, scores`` (bench/ on ``sys.path``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import TruncatedSVD
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import normalize
from sklearn.svm import LinearSVC


class BinaryTfidf:
    """The published TF-IDF on binarised counts; the idf is learned from the reference."""

    def fit(self, counts: sp.csr_matrix) -> BinaryTfidf:
        binary = (counts > 0).astype(np.float64)
        peak_total = np.asarray(binary.sum(axis=0)).ravel()
        with np.errstate(divide="ignore"):
            self.idf = np.where(peak_total > 0, binary.shape[0] / peak_total, 0.0)
        return self

    def transform(self, counts: sp.csr_matrix) -> sp.csr_matrix:
        binary = sp.csr_matrix((counts > 0).astype(np.float64))
        cell_total = np.asarray(binary.sum(axis=1)).ravel()
        rows = np.repeat(np.arange(binary.shape[0]), np.diff(binary.indptr))
        tf = binary.data / np.maximum(cell_total[rows], 1.0)
        values = np.log1p(1e4 * tf * self.idf[binary.indices])
        out = sp.csr_matrix((values, binary.indices, binary.indptr), shape=binary.shape)
        out.eliminate_zeros()
        return out


def tfidf_logreg(ref: sp.csr_matrix, labels: np.ndarray, query: sp.csr_matrix) -> np.ndarray:
    """TF-IDF + logistic regression (C=1)."""
    tfidf = BinaryTfidf().fit(ref)
    model = LogisticRegression(C=1.0, max_iter=1000)
    model.fit(tfidf.transform(ref), labels)
    return model.predict(tfidf.transform(query))


def lsi_knn(ref: sp.csr_matrix, labels: np.ndarray, query: sp.csr_matrix, k: int = 15) -> np.ndarray:
    """LSI (50-component SVD, first dropped, L2 rows) + kNN (k=15)."""
    tfidf = BinaryTfidf().fit(ref)
    svd = TruncatedSVD(n_components=50, random_state=0).fit(tfidf.transform(ref))

    def embed(counts: sp.csr_matrix) -> np.ndarray:
        return normalize(svd.transform(tfidf.transform(counts))[:, 1:])

    model = KNeighborsClassifier(n_neighbors=k).fit(embed(ref), labels)
    return model.predict(embed(query))


#: The CV-tuned linear model's grid: (name, estimator factory, rows L2-normalised).
LINEAR_GRID = [
    *(
        (f"LR C={c} {w or 'none'}", lambda c=c, w=w: LogisticRegression(C=c, class_weight=w, max_iter=1000), False)
        for c in (0.3, 1.0, 3.0)
        for w in (None, "balanced")
    ),
    *(
        (f"SVM C={c} {w or 'none'}", lambda c=c, w=w: LinearSVC(C=c, class_weight=w), True)
        for c in (0.1, 0.3, 1.0)
        for w in (None, "balanced")
    ),
]


def cv_tuned_linear(ref: sp.csr_matrix, labels: np.ndarray, query: sp.csr_matrix) -> np.ndarray:
    """The grid's configuration with the best 3-fold CV macro-F1 on the reference, refitted."""
    predicted, _ = cv_tuned_linear_with_choice(ref, labels, query)
    return predicted


def cv_tuned_linear_with_choice(
    ref: sp.csr_matrix, labels: np.ndarray, query: sp.csr_matrix
) -> tuple[np.ndarray, dict[str, float]]:
    """:func:`cv_tuned_linear`'s predictions and every configuration's CV macro-F1."""
    tfidf = BinaryTfidf().fit(ref)
    x_ref, x_query = tfidf.transform(ref), tfidf.transform(query)
    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=0)
    cv: dict[str, float] = {}
    for name, make, l2 in LINEAR_GRID:
        x = normalize(x_ref) if l2 else x_ref
        guess = cross_val_predict(make(), x, labels, cv=folds)
        cv[name] = float(f1_score(labels, guess, average="macro"))
    best = max(cv, key=cv.get)
    _, make, l2 = next(entry for entry in LINEAR_GRID if entry[0] == best)
    model = make().fit(normalize(x_ref) if l2 else x_ref, labels)
    return model.predict(normalize(x_query) if l2 else x_query), {"chosen": best, **cv}


def self_trained_lr(ref: sp.csr_matrix, labels: np.ndarray, query: sp.csr_matrix, fraction: float = 0.3) -> np.ndarray:
    """LR (C=1), refitted with the most confident ``fraction`` of each predicted query type."""
    tfidf = BinaryTfidf().fit(ref)
    x_ref, x_query = tfidf.transform(ref), tfidf.transform(query)
    model = LogisticRegression(C=1.0, max_iter=1000).fit(x_ref, labels)
    probabilities = model.predict_proba(x_query)
    guess, confidence = model.classes_[probabilities.argmax(1)], probabilities.max(1)
    chosen = []
    for name in np.unique(guess):
        members = np.flatnonzero(guess == name)
        keep = max(1, int(round(fraction * len(members))))
        chosen.append(members[np.argsort(-confidence[members], kind="stable")[:keep]])
    pick = np.sort(np.concatenate(chosen))
    model = LogisticRegression(C=1.0, max_iter=1000).fit(
        sp.vstack([x_ref, x_query[pick]]).tocsr(), np.concatenate([labels, guess[pick]])
    )
    return model.predict(x_query)


BASELINES: dict[str, Callable[[sp.csr_matrix, np.ndarray, sp.csr_matrix], np.ndarray]] = {
    "TF-IDF + logistic regression": tfidf_logreg,
    "LSI + kNN (k=15)": lsi_knn,
    "CV-tuned linear": cv_tuned_linear,
    "self-trained LR": self_trained_lr,
}


def scores(truth: Sequence[str], predicted: Sequence[str], rare: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 (over the true types), Cohen's kappa and per-type F1 of ``rare``."""
    truth, predicted = np.asarray(truth, dtype=object), np.asarray(predicted, dtype=object)
    types = sorted(set(truth))
    per_type = f1_score(truth, predicted, labels=types, average=None, zero_division=0)
    f1_of = dict(zip(types, per_type))
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(np.mean(per_type)),
        "kappa": float(cohen_kappa_score(truth, predicted)),
        "rare_f1": {t: float(f1_of.get(t, 0.0)) for t in rare},
    }


def run_baselines(
    ref: sp.csr_matrix, labels: np.ndarray, query: sp.csr_matrix, truth: np.ndarray, rare: Sequence[str]
) -> list[dict[str, Any]]:
    """Every baseline on one split: scores plus wall time."""
    results = []
    for name, method in BASELINES.items():
        started = time.perf_counter()
        extra: dict[str, Any] = {}
        if method is cv_tuned_linear:
            predicted, extra["cv_macro_f1"] = cv_tuned_linear_with_choice(ref, labels, query)
        else:
            predicted = method(ref, labels, query)
        elapsed = round(time.perf_counter() - started, 2)
        results.append({"method": name, **scores(truth, predicted, rare), "wall_s": elapsed, **extra})
    return results
