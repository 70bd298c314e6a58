"""Benchmark of ``hitanno cluster`` (AttentionAE-sc).

1. Baron mouse 1 pancreas (822 cells, 13 types; ``../shared/data``): the standard
   baseline — normalise 1e4, log1p, 2500 HVG by dispersion, z-score, PCA-50, 15-NN
   (euclidean, UMAP connectivities, as ``scanpy.pp.neighbors``), Leiden — and
   ``hitanno cluster`` with its published defaults, both at the same resolution, over
   several seeds; ARI, NMI (mean ± sd, min–max) and wall time, in the same run.
2. Scale: a simulated 50 000-cell count matrix clustered with ``--max-cells 50000``
   (every cell trained on, in batches); wall time and peak RSS of that process.

Usage::

    python bench/cluster.py                      # both parts (~20 min on 2 cores)
    python bench/cluster.py --skip-scale         # Baron only, published epochs, seeds 0,1,2
    python bench/cluster.py --skip-baron --scale-pretrain 20 --scale-cluster 10   # longer scale run

The scale run uses ``--batch-size 1024 --knn`` and 5 + 3 epochs by default (the
published 200 + 100 would take hours on a 2-core CPU).

Results are printed and written to ``bench/results/cluster.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hitanno_cli.clustering.graph import leiden, nearest_neighbors, umap_connectivities  # noqa: E402
from hitanno_cli.clustering.preprocess import pca, prepare, read_counts  # noqa: E402

BARON = ROOT.parent / "shared" / "data" / "baron2016_mouse1_pancreas.h5ad"
RESULTS = ROOT / "bench" / "results"


def baseline(path: Path, label_key: str, resolution: float, seed: int) -> dict:
    """The standard pipeline, from the same preprocessing code as ``hitanno cluster``."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    start = time.perf_counter()
    counts = read_counts(path, label_key)
    data = prepare(counts, "rna", 2500, seed)
    pcs = pca(data.features, 50, seed)
    indices, distances = nearest_neighbors(pcs, 14, "euclidean")
    labels = leiden(umap_connectivities(indices, distances, 15), resolution, seed)
    truth = data.labels.astype(str)
    return {
        "ari": adjusted_rand_score(truth, labels),
        "nmi": normalized_mutual_info_score(truth, labels),
        "n_clusters": int(labels.max() + 1),
        "seconds": time.perf_counter() - start,
    }


def run_cli(args: list[str]) -> tuple[dict, float]:
    """``hitanno cluster`` in a fresh process; returns its metrics.json and wall time."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "hitanno_cli", "cluster", *args], cwd=ROOT, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"hitanno cluster failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = Path(args[args.index("-o") + 1])
    return json.loads((out / "metrics.json").read_text()), wall


def spread(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {
        "mean": float(a.mean()),
        "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "values": [float(v) for v in a],
    }


def fmt(s: dict) -> str:
    return f"{s['mean']:.3f} ± {s['sd']:.3f} (min {s['min']:.3f}, max {s['max']:.3f})"


def bench_baron(seeds: list[int], resolution: float, extra: list[str], work: Path) -> dict:
    print(f"== Baron mouse 1 ({BARON.name}), resolution {resolution}, seeds {seeds}", flush=True)
    base = [baseline(BARON, "cell_type", resolution, s) for s in seeds]
    ours = []
    for s in seeds:
        metrics, wall = run_cli(
            [
                str(BARON),
                "-o",
                str(work / f"baron_{s}"),
                "--label-key",
                "cell_type",
                "--resolution",
                str(resolution),
                "--seed",
                str(s),
                "--device",
                "cpu",
                "-q",
                "--overwrite",
                *extra,
            ]
        )
        ours.append(
            {
                "ari": metrics["ari"],
                "nmi": metrics["nmi"],
                "n_clusters": metrics["n_clusters"],
                "seconds": wall,
                "silhouette": metrics["silhouette"],
                "davies_bouldin": metrics["davies_bouldin"],
                "training": metrics["training"],
            }
        )
        print(
            f"   seed {s}: hitanno cluster ARI {metrics['ari']:.3f} NMI {metrics['nmi']:.3f} "
            f"({metrics['n_clusters']} clusters, {wall:.0f} s); baseline ARI {base[seeds.index(s)]['ari']:.3f} "
            f"NMI {base[seeds.index(s)]['nmi']:.3f} ({base[seeds.index(s)]['n_clusters']} clusters)",
            flush=True,
        )
    result = {"resolution": resolution, "seeds": seeds, "extra_args": extra}
    for name, runs in (("baseline", base), ("hitanno_cluster", ours)):
        result[name] = {
            "ari": spread([r["ari"] for r in runs]),
            "nmi": spread([r["nmi"] for r in runs]),
            "n_clusters": [r["n_clusters"] for r in runs],
            "seconds": spread([r["seconds"] for r in runs]),
            "runs": runs,
        }
    print(f"{'method':<34}{'ARI':<42}{'NMI':<42}wall s (mean)")
    for name, label in (("baseline", "baseline (PCA-50, 15-NN, Leiden)"), ("hitanno_cluster", "hitanno cluster")):
        r = result[name]
        print(f"{label:<34}{fmt(r['ari']):<42}{fmt(r['nmi']):<42}{r['seconds']['mean']:.1f}")
    better = all(result["hitanno_cluster"][m]["mean"] > result["baseline"][m]["mean"] for m in ("ari", "nmi"))
    result["beats_baseline"] = better
    print(f"hitanno cluster above the baseline on both ARI and NMI (means): {better}", flush=True)
    return result


def bench_scale(
    n_cells: int, n_genes: int, *, pretrain: int, cluster: int, batch_size: int, knn: bool, work: Path
) -> dict:
    from hitanno_cli.clustering.simulate import write_counts_h5ad

    print(f"== scale: {n_cells} simulated cells × {n_genes} genes, --max-cells {n_cells}", flush=True)
    path = write_counts_h5ad(work / f"sim_{n_cells}.h5ad", n_cells, n_genes, 12, seed=0)
    args = [
        str(path),
        "-o",
        str(work / f"sim_{n_cells}_out"),
        "--label-key",
        "cluster",
        "--max-cells",
        str(n_cells),
        "--pretrain-epochs",
        str(pretrain),
        "--cluster-epochs",
        str(cluster),
        "--batch-size",
        str(batch_size),
        "--device",
        "cpu",
        "-q",
        "--overwrite",
        "--knn" if knn else "--no-knn",
    ]
    metrics, wall = run_cli(args)
    base = baseline(path, "cluster", 1.0, 0)
    result = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "pretrain_epochs": pretrain,
        "cluster_epochs": cluster,
        "batch_size": batch_size,
        "knn": knn,
        "wall_seconds": wall,
        "peak_rss_gib": metrics["peak_rss_gib"],
        "ari": metrics["ari"],
        "nmi": metrics["nmi"],
        "n_clusters": metrics["n_clusters"],
        "n_training_cells": metrics["n_training_cells"],
        "training": metrics["training"],
        "baseline": base,
    }
    print(
        f"   {wall:.0f} s wall, peak RSS {metrics['peak_rss_gib']:.2f} GiB, ARI {metrics['ari']:.3f} "
        f"NMI {metrics['nmi']:.3f} vs the simulated clusters; phases (s): {metrics['training']['seconds']}",
        flush=True,
    )
    print(
        f"   baseline on the same matrix: ARI {base['ari']:.3f} NMI {base['nmi']:.3f} ({base['seconds']:.0f} s)",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--skip-baron", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--scale-cells", type=int, default=50_000)
    parser.add_argument("--scale-genes", type=int, default=5_000)
    parser.add_argument("--scale-pretrain", type=int, default=5, help="fewer than the published 200: CPU time")
    parser.add_argument("--scale-cluster", type=int, default=3)
    parser.add_argument("--scale-batch", type=int, default=1024)
    parser.add_argument("--scale-soft", action="store_true", help="--no-knn (published) for the scale run")
    parser.add_argument("--work", type=Path, default=None, help="keep outputs here (default: a temp dir)")
    parser.add_argument("--baron-args", default="", help="extra hitanno cluster options for Baron")
    args = parser.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not args.skip_baron:
            if not BARON.exists():
                print(f"skipping Baron: {BARON} is absent")
            else:
                seeds = [int(s) for s in args.seeds.split(",")]
                results["baron"] = bench_baron(seeds, args.resolution, args.baron_args.split(), work)
        if not args.skip_scale:
            results["scale"] = bench_scale(
                args.scale_cells,
                args.scale_genes,
                pretrain=args.scale_pretrain,
                cluster=args.scale_cluster,
                batch_size=args.scale_batch,
                knn=not args.scale_soft,
                work=work,
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cluster.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"written {RESULTS / 'cluster.json'}")


if __name__ == "__main__":
    main()
