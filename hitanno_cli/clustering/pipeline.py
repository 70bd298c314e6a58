"""``hitanno cluster`` end to end: read, preprocess, train, assign, write."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hitanno_cli import artifacts, console, outputs, plotting
from hitanno_cli.clustering import io
from hitanno_cli.clustering.config import TrainConfig
from hitanno_cli.clustering.graph import GraphConfig, check_neighbors
from hitanno_cli.clustering.inference import dissolve_small, embed_and_assign
from hitanno_cli.clustering.partition import min_cluster_size
from hitanno_cli.clustering.preprocess import describe, prepare, read_counts
from hitanno_cli.clustering.trainer import fit
from hitanno_cli.errors import UserError
from hitanno_cli.host import keep_freed_memory
from hitanno_cli.runtime import resolve_device

MODALITIES = ("rna", "atac")
CONNECTIVITIES = ("gauss", "umap")
ADJACENCIES = ("normalized", "raw")


@dataclass(frozen=True)
class ClusterOptions:
    """Everything ``hitanno cluster`` is told (docs/cluster.md says where it departs from the
    published defaults)."""

    label_key: str | None = None
    modality: str = "rna"
    n_hvg: int = 2500
    graph: GraphConfig = GraphConfig()
    n_heads: int = 8
    adjacency: str = "normalized"
    max_cells: int = 4000
    train: TrainConfig = TrainConfig()
    device: str = "auto"
    layer: str | None = None

    def params(self) -> dict[str, Any]:
        """The options as the artifact header records them."""
        return {
            "label_key": self.label_key,
            "modality": self.modality,
            "n_hvg": self.n_hvg,
            "graph": self.graph.__dict__,
            "n_heads": self.n_heads,
            "adjacency": self.adjacency,
            "max_cells": self.max_cells,
            "train": self.train.to_dict(),
            "device": self.device,
            "layer": self.layer,
        }

    def check(self) -> None:
        """Refuse option values that cannot work, before any data is read."""
        choices = {
            "--modality": (self.modality, MODALITIES),
            "--connectivity": (self.graph.connectivity, CONNECTIVITIES),
            "--gcn-adjacency": (self.adjacency, ADJACENCIES),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise UserError(f"{name} '{value}' is not one of {', '.join(allowed)}", f"pass {name} {allowed[0]}")
        if self.graph.n_pcs < 0:
            raise UserError(f"--graph-pcs {self.graph.n_pcs} cannot be negative", "pass 0 (published) or more")
        positive = {
            "--n-hvg": self.n_hvg,
            "--n-heads": self.n_heads,
            "--max-cells": self.max_cells,
            "--batch-size": self.train.batch_size,
            "--pretrain-batch-size": self.train.pretrain_batch_size,
        }
        for name, value in positive.items():
            if value < 1:
                raise UserError(f"{name} {value} must be at least 1", f"pass a positive {name}")
        for name, value in (
            ("--batch-size", self.train.batch_size),
            ("--pretrain-batch-size", self.train.pretrain_batch_size),
        ):
            if value < 2:
                raise UserError(f"{name} must be at least 2 (BatchNorm needs two cells)", f"pass {name} 2 or more")
        if self.train.pretrain_epochs < 0 or self.train.cluster_epochs < 0:
            raise UserError("epochs cannot be negative", "pass --pretrain-epochs and --cluster-epochs of 0 or more")
        if not self.train.lr > 0:
            raise UserError(f"--lr {self.train.lr} must be positive", "pass e.g. --lr 1e-3")
        resolution = self.train.resolution
        if resolution != "auto" and not (isinstance(resolution, (int, float)) and resolution > 0):
            raise UserError(
                f"--resolution {resolution} must be positive or 'auto'", "pass --resolution auto or e.g. 1.0"
            )
        if self.graph.connectivity == "umap" and not self.graph.knn:
            raise UserError(
                "--connectivity umap builds a kNN graph; --no-knn applies to gauss only",
                "drop --no-knn or use --connectivity gauss",
            )
        if self.graph.n_neighbors < 2:
            raise UserError(
                f"--n-neighbors {self.graph.n_neighbors} is too small (it counts the cell itself)",
                "pass --n-neighbors 2 or more",
            )


def cluster(
    data: str | Path,
    *,
    output: str | Path,
    label_key: str | None = None,
    modality: str = "rna",
    resolution: float | str = "auto",
    n_heads: int = 8,
    n_hvg: int = 2500,
    connectivity: str = "gauss",
    knn: bool = True,
    n_neighbors: int = 15,
    graph_pcs: int = 50,
    gcn_adjacency: str = "normalized",
    max_cells: int = 4000,
    pretrain_epochs: int = 50,
    pretrain_batch_size: int = 256,
    cluster_epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 4096,
    device: str = "auto",
    seed: int = 0,
    layer: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Cluster the cells of the ``.h5ad`` ``data`` with AttentionAE-sc and write ``output``.

    The options are those of ``hitanno cluster`` with its defaults. Returns the metrics
    written to ``metrics.json``.
    """
    options = ClusterOptions(
        label_key=label_key,
        modality=modality,
        n_hvg=n_hvg,
        graph=GraphConfig(
            n_neighbors=n_neighbors,
            connectivity=connectivity,
            knn=knn,
            n_pcs=graph_pcs,
        ),
        n_heads=n_heads,
        adjacency=gcn_adjacency,
        max_cells=max_cells,
        train=TrainConfig(
            pretrain_epochs=pretrain_epochs,
            pretrain_batch_size=pretrain_batch_size,
            cluster_epochs=cluster_epochs,
            lr=lr,
            batch_size=batch_size,
            resolution=resolution,
            seed=seed,
        ),
        device=device,
        layer=layer,
    )
    return _run(data, output, options, overwrite=overwrite)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (GiB)."""
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / (1024**3 if sys.platform == "darwin" else 1024**2)


def relabel_centroids(labels: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop centroids no cell chose and number the rest 0.. from the largest cluster, so
    that assigning with the returned centroids gives the returned labels."""
    sizes = np.bincount(labels, minlength=centroids.shape[0])
    used = np.flatnonzero(sizes)
    order = used[np.lexsort((used, -sizes[used]))]
    new_id = np.full(centroids.shape[0], -1, dtype=np.int64)
    new_id[order] = np.arange(order.size)
    return new_id[labels], centroids[order]


def _run(data_path: str | Path, out: str | Path, options: ClusterOptions, *, overwrite: bool = False) -> dict[str, Any]:
    """:func:`cluster` with its options gathered in ``options``."""
    options.check()
    kind, inputs = artifacts.CLUSTER_MODEL, [data_path]
    with outputs.writing(out, kind=kind, overwrite=overwrite, inputs=inputs) as path:
        return _cluster(Path(data_path), path, options)


def _cluster(data_path: Path, out: Path, options: ClusterOptions) -> dict[str, Any]:
    start = time.perf_counter()
    device = resolve_device(options.device)
    keep_freed_memory()
    counts = read_counts(data_path, options.label_key, options.layer, integer=options.modality == "rna")
    data = prepare(counts, options.modality, options.n_hvg, options.train.seed)
    check_neighbors(min(data.n_cells, options.max_cells), options.graph.n_neighbors)
    summary = describe(data)
    if summary["n_empty_cells"]:
        console.warn(f"{summary['n_empty_cells']} cells without counts are left out (empty cluster in labels.csv)")
    console.info(
        f"cluster: {data.n_cells} cells × {data.features.n_features} features ({options.modality}) on {device}"
    )
    result, trainer = fit(
        data,
        graph_config=options.graph,
        train_config=options.train,
        n_heads=options.n_heads,
        max_cells=options.max_cells,
        device=device,
        adjacency=options.adjacency,
    )
    assign_start = time.perf_counter()
    if result.train_index.size == data.n_cells:
        z_t = trainer.embed()
        z, labels = z_t.cpu().numpy(), trainer.assign(z_t)
    else:
        z, labels = embed_and_assign(
            result.model,
            result.centroids,
            data,
            graph_config=options.graph,
            batch_size=options.train.batch_size,
            seed=options.train.seed,
            device=device,
        )
    min_size = min_cluster_size(labels.size)
    kept = dissolve_small(z, labels, result.centroids, min_size)
    moved = kept != labels
    dissolved = {"min_size": min_size, "clusters": int(np.unique(labels[moved]).size), "cells": int(moved.sum())}
    labels, centroids = relabel_centroids(kept, result.centroids)
    assign_seconds = time.perf_counter() - assign_start

    inputs = {"data": artifacts.sha256_file(data_path)}
    header = artifacts.make_header(artifacts.CLUSTER_MODEL, options.params(), inputs)
    metrics = io.cluster_metrics(z, labels, data.labels, options.train.seed)
    history = result.history.summary()
    history["seconds"]["assign"] = round(assign_seconds, 2)
    metrics.update(
        {
            "data": summary,
            "n_training_cells": int(result.train_index.size),
            "dissolved_small_clusters": dissolved,
            "training": history,
            "seconds_total": None,
            "peak_rss_gib": None,
            "device": str(device),
            "header": header,
        }
    )
    with artifacts.atomic_dir(out, overwrite=True) as tmp:
        io.write_labels(tmp / io.LABELS, counts.cell_ids, labels, data.kept)
        io.write_embedding(tmp / io.EMBEDDING, counts.cell_ids, z, labels=labels, kept=data.kept, header=header)
        io.save_model(
            tmp / io.MODEL,
            result.model,
            centroids=centroids,
            transform=data.transform,
            graph_config=options.graph,
            train_config=options.train.to_dict(),
            header=header,
        )
        xy, method = plotting.two_d(z, options.train.seed)
        io.plot_embedding(
            tmp / io.PICTURE, xy, method=method, labels=labels, truth=data.labels, title=Path(data_path).name
        )
        metrics["picture"] = method
        metrics["seconds_total"] = round(time.perf_counter() - start, 2)
        metrics["peak_rss_gib"] = round(peak_rss_gib(), 3)
        artifacts.write_json(tmp / io.METRICS, metrics)
    return metrics


def summary_line(metrics: dict[str, Any], out: str | Path) -> str:
    """One line on what :func:`cluster` found: clusters, scores and where they went."""
    scores = ", ".join(
        f"{k} {metrics[k]:.3f}" for k in ("silhouette", "davies_bouldin", "ari", "nmi") if metrics.get(k) is not None
    )
    return f"cluster: {metrics['n_clusters']} clusters ({scores}) → {out}"
