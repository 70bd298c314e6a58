"""Annotation baselines and scores, as the benchmark settings define them (scikit-learn).

* TF-IDF + logistic regression: the published TF-IDF (``log(1 + 1e4 · tf · idf)``) on
  *binarised* counts, idf from the reference; ``LogisticRegression(C=1)``.
* LSI + kNN (the usual label transfer): 50-component truncated SVD of that TF-IDF,
  first component dropped, rows L2-normalised; ``KNeighborsClassifier(k=15)``.

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
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import normalize


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


BASELINES: dict[str, Callable[[sp.csr_matrix, np.ndarray, sp.csr_matrix], np.ndarray]] = {
    "TF-IDF + logistic regression": tfidf_logreg,
    "LSI + kNN (k=15)": lsi_knn,
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
        predicted = method(ref, labels, query)
        results.append(
            {"method": name, **scores(truth, predicted, rare), "wall_s": round(time.perf_counter() - started, 2)}
        )
    return results
