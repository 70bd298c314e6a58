"""What ``hitanno cluster`` writes, and reading a saved model back.

The output directory (written atomically) holds:

* ``labels.csv`` — ``cell_id,cluster``, one row per input cell in input order; a cell
  without counts has an empty cluster;
* ``embedding.zarr`` — zarr v3 group: ``embedding`` [cells, 16] float32 (NaN rows for
  cells without counts), ``cell_ids``, ``cluster``; the artifact header in its attributes;
* ``model.safetensors`` — the network weights, ``centroids`` and the preprocessing
  tensors (z-score statistics; for scATAC-seq the LSI's IDF and components) under
  ``transform.*``; its metadata holds the header (key ``header``, as annotation models),
  the model/graph/training configuration and the gene (or peak) list as JSON strings,
  and ``content_hash`` over all of it (checked when the model is read);
* ``metrics.json`` — silhouette and Davies–Bouldin on the embedding, ARI and NMI with
  ``--label-key``, cluster sizes, what training did and how long it took;
* ``umap.png`` — the embedding in 2-d (UMAP with ``umap-learn``, else PCA), coloured by
  cluster and, with ``--label-key``, by the given labels.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from hitanno_cli import artifacts, plotting
from hitanno_cli.clustering.graph import GraphConfig
from hitanno_cli.clustering.model import AttentionAE, ModelConfig
from hitanno_cli.clustering.preprocess import Transform
from hitanno_cli.errors import UserError

LABELS = "labels.csv"
EMBEDDING = "embedding.zarr"
MODEL = "model.safetensors"
METRICS = "metrics.json"
PICTURE = "umap.png"
#: Silhouette is quadratic in cells: above this many it is computed on a seeded sample.
SILHOUETTE_SAMPLE = 10_000
#: The safetensors metadata key of the artifact header; files written before used the second.
HEADER_KEY, OLD_HEADER_KEY = "header", "hitanno"


# -- the model --------------------------------------------------------------------------------
@dataclass
class SavedModel:
    """A trained clusterer as read back from ``model.safetensors``."""

    model: AttentionAE
    centroids: np.ndarray
    transform: Transform
    graph_config: GraphConfig
    batch_size: int
    seed: int
    header: dict[str, Any]


def save_model(
    path: Path,
    model: AttentionAE,
    *,
    centroids: np.ndarray,
    transform: Transform,
    graph_config: GraphConfig,
    train_config: dict[str, Any],
    header: dict[str, Any],
) -> None:
    """Write ``model.safetensors``: weights, centroids, preprocessing and configuration."""
    tensors = {f"model.{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    tensors["centroids"] = np.ascontiguousarray(centroids, dtype=np.float32)
    tensors["transform.target_index"] = np.asarray(transform.target_index, dtype=np.int64)
    for name, value in transform.tensors.items():
        tensors[f"transform.{name}"] = np.ascontiguousarray(value)
    metadata = {
        HEADER_KEY: json.dumps(header),
        "model_config": json.dumps(model.config.to_dict()),
        "graph_config": json.dumps(graph_config.__dict__),
        "train_config": json.dumps(train_config),
        "modality": transform.modality,
        "features": json.dumps(transform.input_features),
    }
    metadata["content_hash"] = _content_hash(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def _content_hash(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    """The hash annotation models carry (every tensor and metadata entry), over numpy arrays."""
    from hitanno_cli.checkpoint import content_hash

    return content_hash({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, metadata)


def load_model(path: str | Path) -> SavedModel:
    """Read a clusterer, refusing files that are not one (one-line errors)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model {path} does not exist", "pass the model.safetensors that hitanno cluster wrote")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
        header = json.loads(metadata[HEADER_KEY if HEADER_KEY in metadata else OLD_HEADER_KEY])
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError):
        raise UserError(
            f"{path} is not a hitanno cluster model", "pass the model.safetensors that hitanno cluster wrote"
        ) from None
    artifacts.check_header(header, artifacts.CLUSTER_MODEL, path)
    hashed = artifacts.is_hashed(header) or "content_hash" in metadata  # 1.0 files had no hash
    if hashed and metadata.get("content_hash") != _content_hash(tensors, metadata):
        raise UserError(
            f"{path} is corrupted or was edited: its content does not match its hash",
            "re-create it with hitanno cluster",
        )
    config = ModelConfig(**json.loads(metadata["model_config"]))
    model = AttentionAE(config)
    state = {k[len("model.") :]: torch.from_numpy(v.copy()) for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(state)
    model.eval()
    extra = {
        k[len("transform.") :]: v
        for k, v in tensors.items()
        if k.startswith("transform.") and k != "transform.target_index"
    }
    transform = Transform(
        metadata["modality"], json.loads(metadata["features"]), tensors["transform.target_index"], extra
    )
    train_config = json.loads(metadata["train_config"])
    return SavedModel(
        model,
        tensors["centroids"],
        transform,
        GraphConfig(**json.loads(metadata["graph_config"])),
        int(train_config["batch_size"]),
        int(train_config["seed"]),
        header,
    )


# -- tables and arrays --------------------------------------------------------------------------
def full_length(values: np.ndarray, kept: np.ndarray, fill: Any) -> np.ndarray:
    """Spread per-kept-cell ``values`` over all input cells, ``fill`` where dropped."""
    shape = (kept.size,) + values.shape[1:]
    out = np.full(shape, fill, dtype=values.dtype if fill is not None else object)
    out[kept] = values
    return out


def write_labels(path: Path, cell_ids: np.ndarray, labels: np.ndarray, kept: np.ndarray) -> None:
    """``labels.csv``: every input cell, in input order; empty cluster where dropped."""
    column = full_length(labels.astype(object), kept, None)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["cell_id", "cluster"])
        for cell, cluster in zip(cell_ids, column, strict=True):
            writer.writerow([cell, "" if cluster is None else int(cluster)])


def read_labels(path: str | Path) -> dict[str, int | None]:
    """``labels.csv`` back as ``{cell_id: cluster or None}``."""
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["cell_id"]: (int(row["cluster"]) if row["cluster"] else None) for row in csv.DictReader(handle)}


def write_embedding(
    path: Path,
    cell_ids: np.ndarray,
    z: np.ndarray,
    *,
    labels: np.ndarray,
    kept: np.ndarray,
    header: dict[str, Any],
) -> None:
    """``embedding.zarr``: the latent codes of all input cells (NaN rows where dropped)."""
    full = np.full((kept.size, z.shape[1]), np.nan, dtype=np.float32)
    full[kept] = z
    clusters = np.full(kept.size, -1, dtype=np.int64)
    clusters[kept] = labels
    group = zarr.open_group(path, mode="w", zarr_format=3)
    chunk = max(1, min(kept.size, 65536))
    group.create_array("embedding", shape=full.shape, chunks=(chunk, full.shape[1]), dtype="float32")[:] = full
    group.create_array("cluster", shape=clusters.shape, chunks=(chunk,), dtype="int64", fill_value=-1)[:] = clusters
    ids = np.asarray(cell_ids, dtype=str)
    group.create_array("cell_ids", shape=ids.shape, chunks=(chunk,), dtype=str)[:] = ids
    group.attrs["hitanno"] = {
        "header": header,
        "n_cells": int(kept.size),
        "n_kept": int(kept.sum()),
        "cluster_missing": -1,
    }


# -- metrics and picture ----------------------------------------------------------------------------
def cluster_metrics(z: np.ndarray, labels: np.ndarray, truth: np.ndarray | None, seed: int) -> dict[str, Any]:
    """Silhouette (on a sample above :data:`SILHOUETTE_SAMPLE` cells) and Davies–Bouldin
    of the clusters in the embedding; ARI and NMI against ``truth`` (cells with a label)."""
    from sklearn.metrics import (
        adjusted_rand_score,
        davies_bouldin_score,
        normalized_mutual_info_score,
        silhouette_score,
    )

    n_clusters = int(np.unique(labels).size)
    out: dict[str, Any] = {"n_clusters": n_clusters, "cluster_sizes": np.bincount(labels).tolist()}
    if 1 < n_clusters < z.shape[0]:
        sample = min(z.shape[0], SILHOUETTE_SAMPLE)
        out["silhouette"] = float(
            silhouette_score(z, labels, sample_size=sample if sample < z.shape[0] else None, random_state=seed)
        )
        out["silhouette_cells"] = sample
        out["davies_bouldin"] = float(davies_bouldin_score(z, labels))
    else:
        out["silhouette"] = out["davies_bouldin"] = None
    if truth is not None:
        known = np.array([t is not None for t in truth])
        out["ari"] = float(adjusted_rand_score(truth[known].astype(str), labels[known]))
        out["nmi"] = float(normalized_mutual_info_score(truth[known].astype(str), labels[known]))
        out["n_labelled_cells"] = int(known.sum())
    return out


def picture_caption(method: str) -> str | None:
    """What the picture says when it is not the UMAP its name promises."""
    if method == "UMAP":
        return None
    import importlib.util

    why = "umap-learn is not installed" if importlib.util.find_spec("umap") is None else "too few cells for UMAP"
    return f"{method} of the embedding, not UMAP: {why}"


def plot_embedding(
    path: Path,
    xy: np.ndarray,
    *,
    method: str,
    labels: np.ndarray,
    truth: np.ndarray | None,
    title: str,
) -> None:
    """``umap.png``: the 2-d map ``xy`` (made by ``method``) coloured by cluster and,
    with ``truth``, by the given labels."""
    plt = plotting.pyplot()
    panels = [("cluster", labels.astype(str))]
    if truth is not None:
        panels.append(("given label", np.array(["(none)" if t is None else str(t) for t in truth])))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.5), squeeze=False)
    size = max(0.5, min(8.0, 4000.0 / max(len(xy), 1)))
    for ax, (name, values) in zip(axes[0], panels, strict=True):
        cats, codes = np.unique(values, return_inverse=True)
        cmap = plt.get_cmap("tab20" if cats.size <= 20 else "nipy_spectral", max(cats.size, 2))
        for i, cat in enumerate(cats):
            mask = codes == i
            ax.scatter(xy[mask, 0], xy[mask, 1], s=size, color=cmap(i), label=cat, linewidths=0)
        ax.set_title(f"{title}: {name}")
        ax.set_xlabel(f"{method} 1")
        ax.set_ylabel(f"{method} 2")
        ax.set_xticks([])
        ax.set_yticks([])
        if cats.size <= 40:
            ax.legend(
                markerscale=max(1.0, 6.0 / size),
                fontsize=7,
                loc="center left",
                bbox_to_anchor=(1.0, 0.5),
                frameon=False,
            )
    caption = picture_caption(method)
    if caption:
        fig.suptitle(caption, fontsize=9, color="firebrick")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
