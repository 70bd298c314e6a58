"""Where self-training starts: six rules for the initial partition, on one pre-training each.

For every data set and seed the model is pre-trained once (``hitanno cluster``'s defaults:
50 epochs in batches of 256 cells, kNN graph on PCA-50 / LSI, the same sampling above
4 000 cells; ``--pretrain-epochs`` and ``--pretrain-batch-size`` change them); then each
rule below gives an initial partition (small clusters merged, centroids = latent means),
and self-training (DEC, the defaults) runs from it, from the same pre-trained weights and
the same random state. Reported: the ARI of the start and of the final clusters against
the labels, and the number of clusters, beside ``bench/cluster.py``'s Leiden baseline on
the whole data set in the same run (at resolution 1.0 and at its best resolution by ARI).
Labels only score; no rule looks at them.

Rules:

* ``auto`` — the default (``--resolution auto``): Leiden on the latent kNN graph at the
  resolution whose partition has the highest latent silhouette, if ≥ 0.5, else Leiden
  at 1.0 on the cell graph;
* ``auto, latent fallback`` — the same, falling back to 1.0 on the latent graph;
* ``latent 1.0`` — the published start: Leiden at 1.0 on the latent kNN graph;
* ``cells 1.0`` — Leiden at 1.0 on the cell graph the model was trained with (the input
  space: what the standard Leiden pipeline clusters);
* ``latent stable`` / ``cells stable`` — on either graph, the resolution whose Leiden
  partitions agree most across four Leiden seeds (mean pairwise ARI; ties: the finer).

Usage::

    python bench/cluster_starts.py                          # every data set, seeds 0-2
    python bench/cluster_starts.py --only sim,baron --seeds 0

Results are printed and written to ``bench/results/cluster_starts.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sklearn.metrics import adjusted_rand_score  # noqa: E402

from bench.cluster import DATA, RESULTS, SETS, baseline, simulated_set  # noqa: E402
from hitanno_cli.clustering import partition  # noqa: E402
from hitanno_cli.clustering.config import TrainConfig  # noqa: E402
from hitanno_cli.clustering.counts import read_counts  # noqa: E402
from hitanno_cli.clustering.graph import GraphConfig, build_graph, leiden  # noqa: E402
from hitanno_cli.clustering.inference import graph_input  # noqa: E402
from hitanno_cli.clustering.model import AttentionAE, ModelConfig  # noqa: E402
from hitanno_cli.clustering.pipeline import ClusterOptions  # noqa: E402
from hitanno_cli.clustering.preprocess import prepare  # noqa: E402
from hitanno_cli.clustering.trainer import Trainer  # noqa: E402

RULES = ("auto", "auto, latent fallback", "latent 1.0", "cells 1.0", "latent stable", "cells stable")
MAX_CELLS = ClusterOptions.max_cells  # hitanno cluster's --max-cells
STABILITY_SEEDS = (0, 1, 2, 3)


def most_stable(graph, seeds=STABILITY_SEEDS) -> tuple[float, np.ndarray]:
    """The resolution whose Leiden partitions agree most across seeds (≥ 2 clusters; ties:
    the finer), and its partition for the first seed."""
    found = {}
    for r in partition.RESOLUTIONS:
        runs = [leiden(graph, r, s) for s in seeds]
        pairs = [adjusted_rand_score(runs[i], runs[j]) for i in range(len(runs)) for j in range(i + 1, len(runs))]
        found[r] = (float(np.mean(pairs)), runs[0])
    best = max(found, key=lambda r: (found[r][1].max() > 0, round(found[r][0], 3), r))
    return best, found[best][1]


def starts(z: np.ndarray, cell_graph, seed: int, config: GraphConfig) -> dict[str, np.ndarray]:
    """Each rule's initial labels for latent codes ``z`` (small clusters merged)."""
    latent_graph = build_graph(z, config)
    size = partition.min_cluster_size(z.shape[0])
    merged = lambda labels: partition.merge_small(z, labels, size)  # noqa: E731
    auto = partition.initial_partition(z, resolution="auto", graph_config=config, seed=seed, cell_graph=cell_graph)
    latent_fallback = partition.initial_partition(z, resolution="auto", graph_config=config, seed=seed)
    return {
        "auto": auto.labels,
        "auto, latent fallback": latent_fallback.labels,
        "latent 1.0": merged(leiden(latent_graph, 1.0, seed)),
        "cells 1.0": merged(leiden(cell_graph, 1.0, seed)),
        "latent stable": merged(most_stable(latent_graph)[1]),
        "cells stable": merged(most_stable(cell_graph)[1]),
    }


def data_path(name: str, work: Path) -> Path:
    """The data set's file (the simulated one written on first use)."""
    return simulated_set(work) if name == "sim" else DATA / SETS[name][0]


def load(name: str, seed: int, work: Path):
    """The prepared data (sampled to MAX_CELLS as hitanno cluster does) and its labels."""
    _, modality, key = SETS[name]
    path = data_path(name, work)
    data = prepare(read_counts(path, key, None, integer=modality == "rna"), modality, 2500, seed)
    torch.manual_seed(seed)
    if data.n_cells > MAX_CELLS:
        rng = np.random.default_rng(seed)
        data = data.subset(np.sort(rng.choice(data.n_cells, size=MAX_CELLS, replace=False)))
    return data, modality, np.asarray(data.labels).astype(str)


def run(
    name: str,
    seed: int,
    work: Path,
    pretrain_epochs: int = TrainConfig.pretrain_epochs,
    pretrain_batch_size: int = TrainConfig.pretrain_batch_size,
) -> dict:
    """Pre-train once, then self-train from every rule's start."""
    data, modality, truth = load(name, seed, work)
    config = GraphConfig()
    started = time.perf_counter()
    cell_graph = build_graph(graph_input(data.features, config, seed), config)
    model = AttentionAE(
        ModelConfig(
            n_input=data.features.n_features,
            n_output=int(data.target.shape[1]),
            likelihood="zinb" if modality == "rna" else "bernoulli",
            n_heads=8,
            adjacency="normalized",
        )
    )
    trainer = Trainer(
        model,
        data,
        graph=cell_graph,
        graph_config=config,
        cfg=TrainConfig(seed=seed, pretrain_epochs=pretrain_epochs, pretrain_batch_size=pretrain_batch_size),
        device=torch.device("cpu"),
    )
    trainer.pretrain()
    z = trainer.embed().cpu().numpy()
    result = {"set": name, "seed": seed, "pretrain_s": round(time.perf_counter() - started, 1), "rules": {}}
    weights = copy.deepcopy(trainer.model.state_dict())
    for rule, labels in starts(z, cell_graph, seed, config).items():
        trainer.model.load_state_dict(weights)
        trainer.centroids = torch.nn.Parameter(torch.from_numpy(partition.centroids_of(z, labels)))
        trainer.history = type(trainer.history)()
        torch.manual_seed(seed)
        trainer.cluster()
        final = trainer.assign(trainer.embed())
        result["rules"][rule] = {
            "start_ari": round(float(adjusted_rand_score(truth, labels)), 3),
            "start_clusters": int(labels.max()) + 1,
            "final_ari": round(float(adjusted_rand_score(truth, final)), 3),
            "final_clusters": int(np.unique(final).size),
        }
        print(f"   {name} seed {seed} {rule:13s} {result['rules'][rule]}", flush=True)
    return result


def table(results: list[dict], baselines: dict[str, dict]) -> str:
    """Per set and rule: every seed's start → final ARI (final clusters), and the mean final ARI."""
    lines = ["| set | rule | seeds: start → final ARI (clusters) | mean final ARI |", "| --- | --- | --- | ---: |"]
    for name in dict.fromkeys(r["set"] for r in results):
        runs = [r for r in results if r["set"] == name]
        base = baselines[name]
        lines.append(
            f"| {name} | Leiden baseline | res 1.0: {base['res_1']['ari']:.3f} ({base['res_1']['n_clusters']}); "
            f"best, res {base['best_resolution']}: {base['best']['ari']:.3f} ({base['best']['n_clusters']}) | |"
        )
        for rule in RULES:
            cells = [r["rules"][rule] for r in runs]
            seeds = ", ".join(f"{c['start_ari']:.3f} → {c['final_ari']:.3f} ({c['final_clusters']})" for c in cells)
            lines.append(f"| {name} | {rule} | {seeds} | {np.mean([c['final_ari'] for c in cells]):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(SETS), help="comma-separated data sets")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--pretrain-epochs", type=int, default=TrainConfig.pretrain_epochs)
    parser.add_argument("--pretrain-batch-size", type=int, default=TrainConfig.pretrain_batch_size)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one run per core)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "cluster_starts")
    parser.add_argument("--out", type=Path, default=RESULTS / "cluster_starts.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    results, baselines = [], {}
    for name in args.only.split(","):
        if name != "sim" and not (DATA / SETS[name][0]).exists():
            print(f"skipping {name}: {DATA / SETS[name][0]} is absent")
            continue
        baselines[name] = baseline(data_path(name, args.work), SETS[name][1], SETS[name][2])
        for seed in (int(s) for s in args.seeds.split(",")):
            results.append(run(name, seed, args.work, args.pretrain_epochs, args.pretrain_batch_size))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            report = {"baselines": baselines, "runs": results}
            args.out.write_text(json.dumps(report, indent=1) + "\n")  # what is done so far
    print(table(results, baselines))


if __name__ == "__main__":
    main()
