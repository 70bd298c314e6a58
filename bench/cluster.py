"""Benchmark of ``hitanno cluster`` against Leiden baselines, every data set in one run.

For every data set: the standard Leiden baseline at every resolution of
:data:`RESOLUTIONS` (scRNA-seq: normalise 1e4, log1p, 2 500 HVG, z-score, PCA-50,
15-NN, UMAP connectivities, Leiden; scATAC-seq: binary TF-IDF, 30-component SVD
without its first component, 15-NN, UMAP connectivities, Leiden), then
``hitanno cluster`` with its defaults over 5 seeds in fresh processes: ARI, NMI and
the number of clusters of every seed, mean ± sd, and wall time beside the baseline's
(same run, same machine). Labels only score; nothing is chosen by them.

Data: the scRNA-seq and scATAC-seq sets in ``../shared/data`` (Baron mouse 1,
Buenrostro 2015, Granja 2019) when present, and a simulated count matrix with known
clusters. ``--scale`` adds a simulated 50 000-cell run (``--max-cells 50000``, few
epochs) with its wall time and peak memory.

Usage::

    python bench/cluster.py                        # every data set, seeds 0-4
    python bench/cluster.py --only baron,sim --seeds 0,1
    python bench/cluster.py --args "--no-knn --resolution 1"   # other hitanno options
    python bench/cluster.py --only none --scale    # the 50 000-cell run alone

Results are printed as tables and written to ``bench/results/cluster.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hitanno_cli.clustering.counts import read_counts, row_sums  # noqa: E402
from hitanno_cli.clustering.graph import leiden, nearest_neighbors, umap_connectivities  # noqa: E402
from hitanno_cli.clustering.preprocess import pca, prepare  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results"
RESOLUTIONS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2)
#: name → (file, modality, label column); "sim" is written by the benchmark.
SETS = {
    "baron": ("baron2016_mouse1_pancreas.h5ad", "rna", "cell_type"),
    "buenrostro": ("buenrostro2015_atac.h5ad", "atac", "cell_type"),
    "sim": ("simulated", "rna", "cluster"),
    "granja": ("granja2019_bmmc_atac.h5ad", "atac", "cell_type"),
}


def simulated_set(work: Path) -> Path:
    """The simulated count matrix with known clusters: 1 500 cells × 2 000 genes, 8 clusters
    of 60 marker genes × 4 (written into ``work`` on first use)."""
    from hitanno_cli.clustering.simulate import write_counts_h5ad

    path = work / "sim.h5ad"
    return path if path.exists() else write_counts_h5ad(path, 1500, 2000, 8, seed=1, markers=60, fold=4.0)


def scores(truth: np.ndarray, labels: np.ndarray) -> dict:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {
        "ari": float(adjusted_rand_score(truth, labels)),
        "nmi": float(normalized_mutual_info_score(truth, labels)),
        "n_clusters": int(np.unique(labels).size),
    }


def rna_space(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """PCA-50 of the HVG z-scores (the same preprocessing code as ``hitanno cluster``)."""
    data = prepare(read_counts(path, label_key), "rna", 2500, 0)
    return pca(data.features, 50, 0), data.labels.astype(str)


def atac_space(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """LSI: binary TF-IDF, 30-component SVD, the first component dropped."""
    from sklearn.decomposition import TruncatedSVD

    from hitanno_cli.tfidf import tfidf

    counts = read_counts(path, label_key, integer=False)
    binary = counts.matrix.copy()
    binary.data[:] = 1.0
    kept = row_sums(binary) > 0
    binary = binary[kept]
    peak_totals = np.asarray(binary.sum(axis=0), dtype=np.float64).ravel()
    binary = binary[:, peak_totals > 0].tocsr()
    values = tfidf(binary, row_sums(binary), peak_totals[peak_totals > 0], binary.shape[0])
    lsi = TruncatedSVD(n_components=30, random_state=0).fit_transform(values)[:, 1:]
    return lsi, counts.labels[kept].astype(str)


def baseline(path: Path, modality: str, label_key: str) -> dict:
    """Leiden on the 15-NN graph of the standard space, at every resolution."""
    start = time.perf_counter()
    space, truth = (rna_space if modality == "rna" else atac_space)(path, label_key)
    indices, distances = nearest_neighbors(space, 14, "euclidean")
    graph = umap_connectivities(indices, distances, 15)
    prepare_seconds = time.perf_counter() - start
    by_resolution = {}
    for r in RESOLUTIONS:
        tick = time.perf_counter()
        by_resolution[str(r)] = scores(truth, leiden(graph, r, 0))
        by_resolution[str(r)]["seconds"] = prepare_seconds + time.perf_counter() - tick
    best = max(by_resolution, key=lambda r: by_resolution[r]["ari"])
    return {
        "by_resolution": by_resolution,
        "res_1": by_resolution["1.0"],
        "best_resolution": best,
        "best": by_resolution[best],
        "seconds": by_resolution["1.0"]["seconds"],
        "n_types": int(np.unique(truth).size),
        "n_cells": int(truth.size),
    }


#: Threads of every hitanno process (``--threads``; None: torch's default).
THREADS: int | None = None
#: Read the outputs an earlier run left in ``--work`` instead of running again (``--reuse``).
REUSE = False


def run_cli(args: list[str]) -> tuple[dict, float]:
    """``hitanno cluster`` in a fresh process; its metrics.json and wall time."""
    env = dict(os.environ)
    if THREADS:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(THREADS)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "hitanno_cli", "cluster", *args], cwd=ROOT, capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"hitanno cluster failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = Path(args[args.index("-o") + 1])
    return json.loads((out / "metrics.json").read_text()), wall


def spread(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0, "min": float(a.min())}


def bench_set(name: str, path: Path, *, modality: str, label_key: str, seeds: list[int], extra: list[str], work: Path):
    base = baseline(path, modality, label_key)
    print(f"== {name}: {base['n_cells']} cells, {base['n_types']} types ({modality})", flush=True)
    line = "  ".join(f"{r}: {v['ari']:.3f}/{v['n_clusters']}" for r, v in base["by_resolution"].items())
    print(f"   Leiden baseline, ARI/clusters by resolution: {line}  ({base['seconds']:.1f} s)", flush=True)
    runs = []
    for seed in seeds:
        args = [str(path), "-o", str(work / f"{name}_{seed}"), "--label-key", label_key, "--modality", modality]
        args += ["--seed", str(seed), "--device", "cpu", "-q", "--overwrite", *extra]
        done = work / f"{name}_{seed}" / "metrics.json"
        if REUSE and done.exists():  # an earlier run's output: its in-process time stands for the wall time
            metrics = json.loads(done.read_text())
            wall = metrics["seconds_total"]
        else:
            metrics, wall = run_cli(args)
        run = {k: metrics[k] for k in ("ari", "nmi", "n_clusters")}
        run.update(seed=seed, seconds=wall, init=metrics["training"].get("initial_partition", {}))
        run["phases"] = metrics["training"]["seconds"]
        runs.append(run)
        print(
            f"   seed {seed}: ARI {run['ari']:.3f} NMI {run['nmi']:.3f}, {run['n_clusters']} clusters "
            f"(initial resolution {run['init'].get('resolution')}), {wall:.0f} s",
            flush=True,
        )
    result = {"baseline": base, "runs": runs, "modality": modality, "extra_args": extra}
    for key in ("ari", "nmi", "seconds"):
        result[key] = spread([r[key] for r in runs])
    result["time_ratio"] = result["seconds"]["mean"] / max(base["seconds"], 1e-9)
    result["seconds_per_1000_cells"] = result["seconds"]["mean"] * 1000 / base["n_cells"]
    return result


def table(results: dict) -> str:
    """The markdown table of every data set."""
    head = (
        "| data | cells / types | hitanno ARI mean ± sd (worst) | NMI mean ± sd | clusters by seed | "
        "Leiden res 1.0 ARI / NMI | best Leiden ARI / NMI (res) | time vs Leiden (s / 1 000 cells) |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    rows = []
    for name, r in results.items():
        if name == "scale":
            continue
        b = r["baseline"]
        rows.append(
            f"| {name} | {b['n_cells']} / {b['n_types']} | {r['ari']['mean']:.3f} ± {r['ari']['sd']:.3f} "
            f"({r['ari']['min']:.3f}) | {r['nmi']['mean']:.3f} ± {r['nmi']['sd']:.3f} | "
            f"{', '.join(str(x['n_clusters']) for x in r['runs'])} | "
            f"{b['res_1']['ari']:.3f} / {b['res_1']['nmi']:.3f} | "
            f"{b['best']['ari']:.3f} / {b['best']['nmi']:.3f} ({b['best_resolution']}) | "
            f"× {r['time_ratio']:.0f} ({r['seconds_per_1000_cells']:.0f} s) |"
        )
    return head + "\n".join(rows)


def bench_scale(work: Path, n_cells: int, epochs: tuple[int, int]) -> dict:
    from hitanno_cli.clustering.simulate import write_counts_h5ad

    path = write_counts_h5ad(work / f"sim_{n_cells}.h5ad", n_cells, 5000, 12, seed=0)
    args = [str(path), "-o", str(work / "scale"), "--label-key", "cluster", "--max-cells", str(n_cells)]
    args += ["--pretrain-epochs", str(epochs[0]), "--cluster-epochs", str(epochs[1]), "--batch-size", "1024"]
    metrics, wall = run_cli([*args, "--device", "cpu", "-q", "--overwrite"])
    result = {"n_cells": n_cells, "epochs": epochs, "wall_seconds": wall, "peak_rss_gib": metrics["peak_rss_gib"]}
    result.update({k: metrics[k] for k in ("ari", "nmi", "n_clusters")}, phases=metrics["training"]["seconds"])
    print(f"== scale: {n_cells} cells, {wall:.0f} s, peak RSS {metrics['peak_rss_gib']:.2f} GiB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--only", default=",".join(SETS), help="comma-separated data sets (none: no data set)")
    parser.add_argument("--args", default="", help="extra hitanno cluster options for every run")
    parser.add_argument("--scale", action="store_true", help="add the simulated 50 000-cell run")
    parser.add_argument("--scale-epochs", default="5,3", help="pre-training,clustering epochs of the scale run")
    parser.add_argument("--work", type=Path, default=None, help="keep outputs here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS / "cluster.json")
    parser.add_argument("--reuse", action="store_true", help="reuse the outputs of an earlier run in --work")
    parser.add_argument("--threads", type=int, default=None, help="threads per hitanno run (a shared machine: 1)")
    args = parser.parse_args()
    global THREADS, REUSE
    THREADS, REUSE = args.threads, args.reuse
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in [n for n in args.only.split(",") if n in SETS]:
            file, modality, label_key = SETS[name]
            if name == "sim":
                path = simulated_set(work)
            else:
                path = DATA / file
                if not path.exists():
                    print(f"skipping {name}: {path} is absent")
                    continue
            results[name] = bench_set(
                name, path, modality=modality, label_key=label_key, seeds=seeds, extra=args.args.split(), work=work
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")  # what is done so far
        if args.scale:
            pre, clu = (int(x) for x in args.scale_epochs.split(","))
            results["scale"] = bench_scale(work, 50_000, (pre, clu))
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
