"""The published preprocessing, written plainly from the paper's description (benchmark baseline).

It loads the whole matrix, computes TF-IDF with a Python loop over every non-zero entry
(as the published code did), ranks peaks per type with a dense one-vs-rest Welch t-test
(``scipy.stats.ttest_ind``, the statistic scanpy's "t-test" computes), merges the sets
rare types first, and writes every cell's dense ``[n_types, P]`` sentence to a .npy file.

    python bench/reference_preprocess.py DATA.h5ad LABEL_KEY OUT_DIR
prints one JSON line: seconds per step and peak RSS.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
from scipy import stats


def tfidf_loop(x) -> np.ndarray:
    """TF-IDF of a CSR matrix, one non-zero at a time (the published formula)."""
    x = x.tocsr()
    n_cells = x.shape[0]
    cell_total = np.asarray(x.sum(axis=1)).ravel()
    peak_total = np.asarray(x.sum(axis=0)).ravel()
    out = np.zeros(x.shape, dtype=np.float64)
    for i in range(n_cells):
        for k in range(x.indptr[i], x.indptr[i + 1]):
            j = x.indices[k]
            tf = x.data[k] / cell_total[i]
            idf = n_cells / peak_total[j]
            out[i, j] = math.log(1 + 1e4 * tf * idf)
    return out


def select(values: np.ndarray, labels: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """Per-type t-test ranking and the rare-first merge."""
    types, sizes = np.unique(labels, return_counts=True)
    p = min(int(math.sqrt(9 / len(types)) * 2000), values.shape[1] // len(types))
    ranking = {}
    for t in types:
        score = stats.ttest_ind(values[labels == t], values[labels != t], equal_var=False).statistic
        score = np.nan_to_num(score, nan=0.0)
        ranking[t] = np.lexsort((np.arange(len(score)), -score))
    taken: set[int] = set()
    order = [t for _, t in sorted(zip(sizes, types))]
    sets = []
    for t in order:
        chosen = [j for j in ranking[t] if j not in taken][:p]
        taken.update(chosen)
        sets.append(np.array(chosen))
    return [str(t) for t in order], sets


def encode(x, sets: list[np.ndarray]) -> np.ndarray:
    """Dense sentences, cell by cell."""
    x = x.tocsr()
    out = np.zeros((x.shape[0], len(sets), len(sets[0])), dtype=np.int8)
    for i in range(x.shape[0]):
        row = x[i].toarray().ravel()
        for t, peaks in enumerate(sets):
            out[i, t] = row[peaks] > 0
    return out


def main(data: str, label_key: str, out_dir: str) -> None:
    timings = {}
    start = time.perf_counter()
    adata = ad.read_h5ad(data)
    labels = adata.obs[label_key].astype(str).to_numpy()
    timings["load_s"] = time.perf_counter() - start
    t = time.perf_counter()
    values = tfidf_loop(adata.X)
    timings["tfidf_s"] = time.perf_counter() - t
    t = time.perf_counter()
    types, sets = select(values, labels)
    timings["ttest_merge_s"] = time.perf_counter() - t
    del values
    t = time.perf_counter()
    sentences = encode(adata.X, sets)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    np.save(Path(out_dir) / "sentences.npy", sentences)
    timings["encode_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    timings["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timings["panel_peaks"] = [s.tolist() for s in sets][:1][0][:5]
    print(json.dumps(timings))


if __name__ == "__main__":
    main(*sys.argv[1:4])
