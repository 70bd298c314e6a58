"""Can ``21_CD4.N2`` be told from ``20_CD4.N1`` at all in Granja's peaks, even within one donor?

For each donor alone, and for both pooled (as the intra split is): 5-fold stratified
cross-validation of TF-IDF + logistic regression
(``bench/baselines.py``'s TF-IDF, idf from each training fold) on the cells of the two
types only, with and without balanced class weights. Prints the held-out F1 of N2 and the
AUC of the model's score, and the AUC of the cell's number of open peaks alone (fewer
peaks → N2) for comparison. Labels from the very donor being predicted are used here, so
this is an upper bound for any cross-donor method on these peaks.

    .venv/bin/python bench/rare_type_separability.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold

sys.path.insert(0, str(Path(__file__).resolve().parent))
from annotate import DATA  # noqa: E402
from baselines import BinaryTfidf  # noqa: E402

PAIR = ("20_CD4.N1", "21_CD4.N2")


def cross_validated(x, is_rare: np.ndarray, class_weight: str | None) -> tuple[float, float]:
    """Held-out (F1 of the rare type, AUC of the decision score) over 5 folds."""
    predicted, score = np.zeros(len(is_rare), bool), np.zeros(len(is_rare))
    for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(x, is_rare):
        tfidf = BinaryTfidf().fit(x[train])
        model = LogisticRegression(C=1.0, max_iter=2000, class_weight=class_weight)
        model.fit(tfidf.transform(x[train]), is_rare[train])
        predicted[test] = model.predict(tfidf.transform(x[test]))
        score[test] = model.decision_function(tfidf.transform(x[test]))
    return f1_score(is_rare, predicted), roc_auc_score(is_rare, score)


def main() -> None:
    if not DATA.exists():
        raise SystemExit(f"{DATA} is absent")
    adata = ad.read_h5ad(DATA)
    print(
        f"| donor | {PAIR[0]} cells | {PAIR[1]} cells | class weights | {PAIR[1]} F1 (5-fold) | AUC "
        "| AUC of open-peak count alone |"
    )
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for donor in [*sorted(adata.obs["donor"].unique()), "both"]:
        of_donor = adata.obs["donor"] == donor if donor != "both" else np.ones(adata.n_obs, bool)
        cells = adata[of_donor & adata.obs["cell_type"].isin(PAIR)]
        x = cells.X.tocsr()
        is_rare = (cells.obs["cell_type"] == PAIR[1]).to_numpy()
        depth_auc = roc_auc_score(is_rare, -np.diff(x.indptr))
        for weights in (None, "balanced"):
            f1, auc = cross_validated(x, is_rare, weights)
            print(
                f"| {donor} | {(~is_rare).sum()} | {is_rare.sum()} | {weights or 'none'} | {f1:.3f} | {auc:.3f} | "
                f"{depth_auc:.3f} |"
            )


if __name__ == "__main__":
    main()
