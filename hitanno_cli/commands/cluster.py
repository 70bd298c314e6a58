"""``cluster``: attention-autoencoder clustering of unlabelled cells (AttentionAE-sc)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from hitanno_cli import console
from hitanno_cli.commands.common import Overwrite, Quiet, command
from hitanno_cli.errors import UserError


class Modality(str, Enum):
    rna = "rna"
    atac = "atac"


class Connectivity(str, Enum):
    gauss = "gauss"
    umap = "umap"


class Adjacency(str, Enum):
    normalized = "normalized"
    raw = "raw"


def parse_resolution(text: str) -> float | str:
    """``--resolution``: ``auto`` or a positive number."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise UserError(f"--resolution {text} is not 'auto' or a positive number", "pass --resolution auto or e.g. 1.0")
    return value


@command
def cluster_cmd(
    data: Annotated[
        Path, typer.Argument(help=".h5ad of raw counts (cells × genes; cells × peaks with --modality atac).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output directory to write.")],
    label_key: Annotated[
        str | None,
        typer.Option("--label-key", "-l", help="obs column of known labels: only for ARI/NMI and the picture."),
    ] = None,
    modality: Annotated[
        Modality, typer.Option(help="rna: HVG z-scores + ZINB loss. atac: binarised, TF-IDF + LSI + Bernoulli loss.")
    ] = Modality.rna,
    resolution: Annotated[
        str,
        typer.Option(
            help="Leiden resolution of the initial clustering: a number (1.0 as published), or auto: "
            "the best separated in the latent space of several resolutions."
        ),
    ] = "auto",
    n_heads: Annotated[int, typer.Option(help="Attention heads.")] = 8,
    n_hvg: Annotated[
        int,
        typer.Option(help="Highly variable genes kept (atac: peaks reconstructed, those weighing most in the LSI)."),
    ] = 2500,
    connectivity: Annotated[
        Connectivity, typer.Option(help="Cell graph weights: Gaussian kernel or UMAP.")
    ] = Connectivity.gauss,
    knn: Annotated[
        bool,
        typer.Option(
            "--knn/--no-knn",
            help="Keep only kNN edges (sparse), or Gaussian weights beyond the k-th neighbour "
            "(--no-knn, as published; gauss only).",
        ),
    ] = True,
    n_neighbors: Annotated[int, typer.Option(help="Neighbours per cell, the cell itself included (as scanpy).")] = 15,
    graph_pcs: Annotated[
        int,
        typer.Option(
            help="Search neighbours on this many principal components of the features; 0 as "
            "published: on the features up to 10 000 cells, PCA-50 above."
        ),
    ] = 50,
    gcn_adjacency: Annotated[
        Adjacency,
        typer.Option(
            help="What the GCN propagates over: normalized D^-1/2(A+I)D^-1/2, or the raw "
            "connectivities (published; their row sums saturate tanh)."
        ),
    ] = Adjacency.normalized,
    max_cells: Annotated[
        int,
        typer.Option(
            help="Train on at most this many cells (a random sample) and assign the rest to the "
            "learned centroids. The published cap was 4000; raise it freely (e.g. 50000)."
        ),
    ] = 4000,
    pretrain_epochs: Annotated[int, typer.Option(help="Pre-training epochs (published: 200, full batch).")] = 50,
    pretrain_batch_size: Annotated[
        int, typer.Option(help="Cells per pre-training step (at least as many as training cells: full batch).")
    ] = 256,
    cluster_epochs: Annotated[int, typer.Option(help="Most clustering epochs (stops earlier by tolerance).")] = 100,
    lr: Annotated[float, typer.Option(help="Adam learning rate of both phases.")] = 1e-3,
    batch_size: Annotated[
        int,
        typer.Option(
            help="Cells per self-training step and attention keys; with at least as many cells as "
            "training cells this is the published full-batch self-training."
        ),
    ] = 4096,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    gpu: Annotated[bool, typer.Option("--gpu", help="Shorthand for --device cuda.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of sampling, training and Leiden.")] = 0,
    layer: Annotated[str | None, typer.Option(help="Read counts from this layer instead of X.")] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Cluster unlabelled cells with AttentionAE-sc: labels, embedding, model, metrics, picture."""
    from hitanno_cli.clustering import cluster
    from hitanno_cli.clustering.pipeline import summary_line

    metrics = cluster(
        data=data,
        output=output,
        label_key=label_key,
        modality=modality.value,
        resolution=parse_resolution(resolution),
        n_heads=n_heads,
        n_hvg=n_hvg,
        connectivity=connectivity.value,
        knn=knn,
        n_neighbors=n_neighbors,
        graph_pcs=graph_pcs,
        gcn_adjacency=gcn_adjacency.value,
        max_cells=max_cells,
        pretrain_epochs=pretrain_epochs,
        pretrain_batch_size=pretrain_batch_size,
        cluster_epochs=cluster_epochs,
        lr=lr,
        batch_size=batch_size,
        device="cuda" if gpu else device,
        seed=seed,
        layer=layer,
        overwrite=overwrite,
    )
    console.info(summary_line(metrics, output))
