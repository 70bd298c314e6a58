"""Annotation benchmark: hitanno end to end against simple baselines, same split, same run.

Settings (the project's benchmark settings): **cross-donor** (reference Granja donor BMMC_D6T1,
query BMMC_D5T1), **intra** (Granja, stratified 70/30 split by cell_type, random_state=0)
and **small** (Buenrostro 2015, 600 cells, the same 70/30 split: a small reference).
For each setting the split is written as temporary ``.h5ad`` files, then hitanno runs
as a user would (``select-peaks``, ``encode``, ``train``, ``predict --h5ad``, each a
separate process, timed) once per seed; the baselines of ``bench/baselines.py`` run on
the same split. Prints a table and writes ``bench/results/annotate.json``.

    python bench/annotate.py [--settings cross-donor,intra,small] [--seeds 42,43] [--self-train] [-- TRAIN OPTIONS]

``--self-train`` adds, per seed, hitanno self-trained on the query (``encode`` of the
query, ``train --adapt-to``), reported as its own method beside the plain run.

Every seed also reports "hitanno + majority voting": the plain run's predictions, voted
over an over-clustering of its query embeddings (``hitanno_cli.majority``), scored alike.

Everything after ``--`` is passed to ``hitanno train`` (e.g. ``-- --epochs 5 --lr 3e-4``).

The summary gives each hitanno method's mean ± sd over seeds (and median), the strongest
baseline of the same run, and the difference to the CV-tuned linear model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import run_baselines, scores  # noqa: E402

from hitanno_cli.majority import majority_vote  # noqa: E402
from hitanno_cli.predictions import read_embeddings, read_predictions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "granja2019_bmmc_atac.h5ad"
SMALL_DATA = ROOT.parent / "shared" / "data" / "buenrostro2015_atac.h5ad"
#: Per setting, the rare types whose F1 the table shows (Buenrostro's types have 50 cells each).
RARE = {
    "cross-donor": ["21_CD4.N2", "01_HSC", "06_CLP.1", "15_CLP.2", "19_CD8.N", "23_CD8.EM"],
    "intra": ["21_CD4.N2", "01_HSC", "06_CLP.1", "15_CLP.2", "19_CD8.N", "23_CD8.EM"],
    "small": [],
}
SETTINGS = tuple(RARE)
#: The baseline every hitanno method is compared with first.
TUNED = "CV-tuned linear"


#: The method name of runs self-trained on the query (``--self-train``).
SELF_TRAINED = "hitanno + self-training"
#: The method name of the plain runs' predictions after majority voting.
MAJORITY = "hitanno + majority voting"


def split(adata: ad.AnnData, setting: str) -> tuple[ad.AnnData, ad.AnnData]:
    """The (reference, query) cells of a benchmark setting."""
    if setting == "cross-donor":
        donor = adata.obs["donor"].astype(str)
        return adata[donor == "BMMC_D6T1"].copy(), adata[donor == "BMMC_D5T1"].copy()
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    ref_idx, query_idx = train_test_split(np.arange(adata.n_obs), test_size=0.3, stratify=labels, random_state=0)
    return adata[np.sort(ref_idx)].copy(), adata[np.sort(query_idx)].copy()


def hitanno(*args: str) -> float:
    """Run one ``hitanno`` stage in its own process; return its wall time."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "hitanno_cli", *args, "-q"], cwd=ROOT, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"hitanno {args[0]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def run_hitanno(
    work: Path, seed: int, train_args: list[str], truth: np.ndarray, *, rare: list[str], self_train: bool = False
) -> dict[str, Any]:
    """select-peaks (once per setting), encode, train, predict; scores and stage times.

    ``self_train``: the query is encoded too and ``train --adapt-to`` self-trains on it.
    """
    times: dict[str, float] = {}
    panel, store = work / "panel.json", work / "ref.zarr"
    if not panel.exists():
        times["select-peaks"] = hitanno("select-peaks", str(work / "ref.h5ad"), "-l", "cell_type", "-o", str(panel))
        times["encode"] = hitanno(
            "encode", str(work / "ref.h5ad"), "-p", str(panel), "-o", str(store), "-l", "cell_type"
        )
    adapt: list[str] = []
    if self_train:
        query_store = work / "query.zarr"
        if not query_store.exists():
            times["encode query"] = hitanno(
                "encode", str(work / "query.h5ad"), "-p", str(panel), "-o", str(query_store)
            )
        adapt = ["--adapt-to", str(query_store)]
    model, pred = work / f"model_{tag(seed, self_train)}", prediction_dir(work, seed, self_train)
    times["train"] = hitanno(
        "train",
        "-s",
        str(store),
        "-p",
        str(panel),
        "-o",
        str(model),
        "--seed",
        str(seed),
        "--overwrite",
        *adapt,
        *train_args,
    )
    times["predict"] = hitanno(
        "predict", "-m", str(model), "--h5ad", str(work / "query.h5ad"), "-o", str(pred), "--overwrite"
    )
    predicted = pd.read_csv(pred / "predictions.csv")["predicted"].astype(str).to_numpy()
    metrics = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    best = next(m for m in reversed(metrics) if m["best"])
    return {
        "method": SELF_TRAINED if self_train else "hitanno",
        "seed": seed,
        **scores(truth, predicted, rare),
        "wall_s": round(sum(times.values()), 2),
        "stage_s": {k: round(v, 2) for k, v in times.items()},
        "epochs_run": len(metrics),
        "best_epoch": best["epoch"],
        "best_val_accuracy": best.get("val_accuracy"),
    }


def tag(seed: int, self_train: bool = False) -> str:
    """The name part of one run's model and prediction folders."""
    return f"{'adapt_' if self_train else ''}seed{seed}"


def prediction_dir(work: Path, seed: int, self_train: bool = False) -> Path:
    """Where ``predict`` writes one run's predictions."""
    return work / f"pred_{tag(seed, self_train)}"


def run_majority(pred: Path, seed: int, truth: np.ndarray, rare: list[str]) -> dict[str, Any]:
    """Majority voting over the plain run's query embeddings, scored as the plain run is."""
    predicted = pd.read_csv(pred / "predictions.csv")["predicted"].astype(str).to_numpy()  # as run_hitanno
    table = read_predictions(pred / "predictions.csv")
    if not np.array_equal(table.predicted.astype(str), predicted):
        raise SystemExit(f"{pred}: the predictions table reads differently with hitanno's reader")
    embeddings = read_embeddings(pred, table.cell_ids)
    if embeddings is None:
        raise SystemExit(f"{pred}: no embeddings for the predicted cells")
    started = time.perf_counter()
    vote = majority_vote(embeddings, predicted, seed=seed)
    elapsed = time.perf_counter() - started
    return {
        "method": MAJORITY,
        "seed": seed,
        **scores(truth, vote.labels.astype(str), rare),
        "wall_s": round(elapsed, 2),
        "stage_s": {"majority vote": round(elapsed, 2)},
        "resolution": vote.resolution,
        "n_clusters": vote.n_clusters,
        "changed": float((vote.labels.astype(str) != predicted).mean()),
        "median_confidence": float(np.median(vote.confidence)),
    }


def run_setting(
    adata: ad.AnnData,
    setting: str,
    *,
    seeds: list[int],
    train_args: list[str],
    work_root: Path,
    self_train: bool = False,
) -> dict[str, Any]:
    """Baselines and hitanno (every seed) on one setting's split."""
    work = work_root / setting
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ref, query = split(adata, setting)
    ref.write_h5ad(work / "ref.h5ad")
    query.write_h5ad(work / "query.h5ad")
    labels, truth = ref.obs["cell_type"].astype(str).to_numpy(), query.obs["cell_type"].astype(str).to_numpy()
    rare = RARE[setting]
    print(f"[{setting}] reference {ref.n_obs} cells, query {query.n_obs} cells", file=sys.stderr)
    results = run_baselines(ref.X.tocsr(), labels, query.X.tocsr(), truth, rare)
    for seed in seeds:
        print(f"[{setting}] hitanno seed {seed} ...", file=sys.stderr)
        results.append(run_hitanno(work, seed, train_args, truth, rare=rare))
        results.append(run_majority(prediction_dir(work, seed), seed, truth, rare))
        if self_train:
            print(f"[{setting}] hitanno seed {seed}, self-trained on the query ...", file=sys.stderr)
            results.append(run_hitanno(work, seed, train_args, truth, rare=rare, self_train=True))
    summary = {"hitanno": summarise(results, "hitanno"), MAJORITY: summarise(results, MAJORITY)}
    if self_train:
        summary[SELF_TRAINED] = summarise(results, SELF_TRAINED)
    return {
        "setting": setting,
        "rare": rare,
        "n_reference": ref.n_obs,
        "n_query": query.n_obs,
        "results": results,
        "summary": summary,
    }


def summarise(results: list[dict[str, Any]], method: str) -> dict[str, Any]:
    """``method``'s mean ± sd and median over seeds, the strongest baseline and the CV-tuned one."""
    ours = [r for r in results if r["method"] == method]
    base = [r for r in results if not r["method"].startswith("hitanno")]
    tuned = next(r for r in base if r["method"] == TUNED)
    out: dict[str, Any] = {}
    for key in ("accuracy", "macro_f1", "kappa"):
        values = np.array([r[key] for r in ours])
        strongest = max(base, key=lambda r: r[key])
        out[key] = {
            "mean": float(values.mean()),
            "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "median": float(np.median(values)),
            "best_baseline": strongest["method"],
            "best_baseline_value": strongest[key],
            "minus_cv_tuned": float(values.mean() - tuned[key]),
            "worst_seed_minus_cv_tuned": float(values.min() - tuned[key]),
        }
    return out


def print_table(report: dict[str, Any]) -> None:
    """One row per method (and seed), then the median ratios to the strongest baseline."""
    for block in report["settings"]:
        header = (
            f"{'method':32} {'seed':>4} {'acc':>6} {'macroF1':>7} {'kappa':>6} "
            + " ".join(f"{t[:9]:>9}" for t in block["rare"])
            + f" {'wall s':>8}"
        )
        print(f"\n== {block['setting']}: reference {block['n_reference']} cells, query {block['n_query']} cells")
        print(header)
        for r in block["results"]:
            rare = " ".join(f"{r['rare_f1'][t]:9.3f}" for t in block["rare"])
            print(
                f"{r['method']:32} {str(r.get('seed', '-')):>4} {r['accuracy']:6.3f} {r['macro_f1']:7.3f} "
                f"{r['kappa']:6.3f} {rare} {r['wall_s']:8.1f}"
            )
        for method, summary in block["summary"].items():
            for key, s in summary.items():
                print(
                    f"  {key}: {method} {s['mean']:.3f} ± {s['sd']:.3f} (median {s['median']:.3f}); "
                    f"{TUNED} {s['mean'] - s['minus_cv_tuned']:.3f} → {s['minus_cv_tuned']:+.3f} "
                    f"(worst seed {s['worst_seed_minus_cv_tuned']:+.3f}); strongest baseline "
                    f"{s['best_baseline']} {s['best_baseline_value']:.3f}"
                )


def main() -> None:
    argv = sys.argv[1:]
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated: cross-donor,intra,small")
    parser.add_argument("--seeds", default="42", help="comma-separated training seeds")
    parser.add_argument("--data", type=Path, default=DATA, help="Granja .h5ad")
    parser.add_argument("--small-data", type=Path, default=SMALL_DATA, help="Buenrostro 2015 .h5ad")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "annotate", help="work directory")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "annotate.json")
    parser.add_argument(
        "--self-train", action="store_true", help="also run each seed self-trained on the query (train --adapt-to)"
    )
    args = parser.parse_args(own)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}")
    sources = {setting: args.small_data if setting == "small" else args.data for setting in settings}
    missing = sorted({str(path) for path in sources.values() if not path.exists()})
    if missing:
        raise SystemExit(f"data not found: {', '.join(missing)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    loaded = {path: ad.read_h5ad(path) for path in set(sources.values())}
    started = time.perf_counter()
    report = {
        "data": {setting: str(path) for setting, path in sources.items()},
        "seeds": seeds,
        "train_args": train_args,
        "device_env": os.environ.get("CUDA_VISIBLE_DEVICES", "cpu/auto"),
        "threads": os.cpu_count(),
        "settings": [
            run_setting(
                loaded[sources[name]],
                name,
                seeds=seeds,
                train_args=train_args,
                work_root=args.work,
                self_train=args.self_train,
            )
            for name in settings
        ],
    }
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {args.out} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
