"""``train``, ``predict`` and ``explain``: from cell sentences to annotated cells."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hitanno_cli import console
from hitanno_cli.commands.common import Overwrite, Quiet, command
from hitanno_cli.errors import UserError
from hitanno_cli.training.options import PSEUDO_LABEL_FRACTION

Device = Annotated[str, typer.Option("--device", help="auto (first GPU, else CPU), cpu or cuda:N.")]
Gpu = Annotated[int | None, typer.Option("--gpu", help="Shorthand for --device cuda:N.")]
Model = Annotated[Path, typer.Option("--model", "-m", help="Model directory written by hitanno train.")]
MajorityVoting = Annotated[
    bool,
    typer.Option(
        "--majority-voting",
        help="Also over-cluster the query (Leiden on a kNN graph of the cell embeddings) and give each "
        "cluster its most common label, written beside the per-cell labels (majority_voting.csv).",
    ),
]
OverClusteringResolution = Annotated[
    float | None,
    typer.Option(
        help="Leiden resolution of --majority-voting's over-clustering. Default: by cell count "
        "(5 below 5 000 cells, up to 30 from 200 000).",
    ),
]


Recipe = Annotated[
    str,
    typer.Option(
        "--recipe",
        help="Named option set: default (the project's measured "
        "recipe, docs/recipe.md) or published (the published HitAnno schedule). "
        "Explicit options override it.",
    ),
]


@command
def train_cmd(
    sentences: Annotated[Path, typer.Option("--sentences", "-s", help="Labelled reference store from encode.")],
    panel: Annotated[
        Path | None, typer.Option("--panel", "-p", help="The store's panel (default: the copy the store holds).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Model directory to write. Default: SENTENCES.model.")
    ] = None,
    recipe: Recipe = "default",
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs; the learning rate reaches 0 at the last.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Cells per batch (per process under torchrun).")] = None,
    min_steps_per_epoch: Annotated[
        int | None,
        typer.Option(
            help="Shrink the batch so that an epoch makes at least this many updates (small references; 0: never)."
        ),
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    warmup_epochs: Annotated[float | None, typer.Option(help="Linear warm-up length in epochs.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adam, or adamw (decoupled weight decay).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay of the optimiser.")] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Stratified share held out for validation (0: none).")
    ] = None,
    patience: Annotated[
        int | None, typer.Option(help="Stop after this many epochs without a better validation loss.")
    ] = None,
    min_epochs: Annotated[int | None, typer.Option(help="Never stop early before this epoch.")] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the split, initial weights, data order, dropout and augmentation.")
    ] = 42,
    class_weight: Annotated[
        str | None, typer.Option(help="none, or balanced (weights ∝ 1/class size) for rare types.")
    ] = None,
    sampling: Annotated[
        str | None,
        typer.Option(
            help="Draw training cells uniformly (each once per epoch), "
            "or per class ∝ 1/size (balanced) or 1/√size (sqrt)."
        ),
    ] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Label smoothing of the training loss.")] = None,
    peak_dropout: Annotated[
        float | None,
        typer.Option(help="Depth augmentation: each training cell loses a random share U(0, this) of its open peaks."),
    ] = None,
    embed_init: Annotated[
        str | None, typer.Option(help="Peak embeddings start random, or from an LSI of the reference (lsi).")
    ] = None,
    embed_lr_scale: Annotated[
        float | None,
        typer.Option(help="Learning-rate multiplier of the per-peak tables (peak embeddings, linear path)."),
    ] = None,
    precision: Annotated[str, typer.Option(help="auto (bf16 on GPUs that support it), fp32 or bf16.")] = "auto",
    embed_dim: Annotated[int | None, typer.Option(help="Embedding size.")] = None,
    heads: Annotated[int | None, typer.Option(help="Attention heads at both levels.")] = None,
    ff: Annotated[int | None, typer.Option(help="Feed-forward size at both levels.")] = None,
    level1_layers: Annotated[int | None, typer.Option(help="Encoder layers within sets.")] = None,
    level2_layers: Annotated[int | None, typer.Option(help="Encoder layers across sets.")] = None,
    head_hidden: Annotated[int | None, typer.Option(help="Hidden size of the classification head.")] = None,
    dropout: Annotated[float | None, typer.Option(help="Hidden-state dropout.")] = None,
    attention: Annotated[str, typer.Option(help="Level-1 attention: auto, sparse, dense or flash.")] = "auto",
    linear_path: Annotated[
        bool | None,
        typer.Option(
            "--linear-path/--no-linear-path",
            help="Add a linear read-out of the open peaks to the logits (not in the published model).",
        ),
    ] = None,
    linear_idf: Annotated[
        bool | None,
        typer.Option(
            "--linear-idf/--no-linear-idf",
            help="Weigh the linear path's open peaks by the reference's idf (TF-IDF rows).",
        ),
    ] = None,
    depth_signal: Annotated[
        bool | None,
        typer.Option(
            "--depth-signal/--no-depth-signal",
            help="Tell level 2 the cell's log open-peak count (not in the published model).",
        ),
    ] = None,
    buffer_cells: Annotated[int, typer.Option(help="Cells held in memory by the shuffle buffer.")] = 200_000,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --output.")] = False,
    adapt_to: Annotated[
        Path | None,
        typer.Option(
            "--adapt-to",
            help="Self-train on this query store (same "
            "panel): train, pseudo-label its most confident cells, train "
            "again on both. The model is then specific to that query.",
        ),
    ] = None,
    pseudo_label_fraction: Annotated[
        float,
        typer.Option(help="With --adapt-to: share of the query cells of each predicted type that are pseudo-labelled."),
    ] = PSEUDO_LABEL_FRACTION,
    device: Device = "auto",
    gpu: Gpu = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Train HitAnno on a labelled sentence store (--recipe default, or the published schedule).
    Ctrl-C saves a resumable state."""
    from hitanno_cli.training import Interrupted, model_options, recipe_options, train

    model = model_options(
        embed_dim=embed_dim,
        heads=heads,
        ff=ff,
        level1_layers=level1_layers,
        level2_layers=level2_layers,
        head_hidden=head_hidden,
        dropout=dropout,
        attention=attention,
        linear_path=linear_path,
        linear_idf=linear_idf,
        depth_signal=depth_signal,
    )
    given = {
        "epochs": epochs,
        "warmup_epochs": warmup_epochs,
        "lr": lr,
        "optimizer": optimizer,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "min_steps_per_epoch": min_steps_per_epoch,
        "val_fraction": val_fraction,
        "patience": patience,
        "min_epochs": min_epochs,
        "class_weight": class_weight,
        "sampling": sampling,
        "label_smoothing": label_smoothing,
        "peak_dropout": peak_dropout,
        "embed_init": embed_init,
        "embed_lr_scale": embed_lr_scale,
    }
    options = recipe_options(
        recipe,
        **{k: v for k, v in given.items() if v is not None},
        seed=seed,
        precision=precision,
        buffer_cells=buffer_cells,
        model=model,
    )
    if adapt_to is not None:
        from hitanno_cli.adaptation import self_train

        if resume:
            raise UserError(
                "--resume cannot continue a self-training run (--adapt-to)", "run it again without --resume"
            )
        from hitanno_cli import outputs

        self_train(
            sentences,
            query=adapt_to,
            panel=panel,
            output=outputs.default_output(sentences, ".model") if output is None else output,
            options=options,
            fraction=pseudo_label_fraction,
            device=device,
            gpu=gpu,
            overwrite=overwrite,
        )
        return
    try:
        train(
            sentences,
            panel=panel,
            output=output,
            options=options,
            device=device,
            gpu=gpu,
            resume=resume,
            overwrite=overwrite,
        )
    except Interrupted as stop:
        console.stderr.print(f"[yellow]{stop}[/yellow]")
        raise typer.Exit(128 + int(stop.signum)) from None


@command
def predict_cmd(
    model: Model,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Directory for predictions.csv, probabilities.zarr and embeddings.zarr. Default: QUERY.predictions.",
        ),
    ] = None,
    sentences: Annotated[
        Path | None, typer.Option("--sentences", "-s", help="Query store encoded with the model's panel.")
    ] = None,
    h5ad: Annotated[
        Path | None,
        typer.Option("--h5ad", help="Query .h5ad (raw counts), encoded on the fly through the model's panel."),
    ] = None,
    label_key: Annotated[
        str | None,
        typer.Option("--label-key", "-l", help="obs column with known labels (h5ad), copied to predictions.csv."),
    ] = None,
    min_confidence: Annotated[
        float, typer.Option(help="Call cells Unassigned below this probability (0: never).")
    ] = 0.0,
    batch_size: Annotated[int, typer.Option(help="Cells per batch (bounds memory).")] = 256,
    min_coverage: Annotated[
        float, typer.Option(help="Refuse an h5ad holding less than this share of the panel's peaks.")
    ] = 0.5,
    layer: Annotated[str | None, typer.Option(help="Read h5ad counts from this layer instead of X.")] = None,
    annotated_h5ad: Annotated[
        Path | None,
        typer.Option(
            "--annotated-h5ad",
            help="With --h5ad: also write a copy of the query with the results in obs, obsm and uns "
            "(hitanno_label, hitanno_confidence, X_hitanno, …).",
        ),
    ] = None,
    majority_voting: MajorityVoting = False,
    over_clustering_resolution: OverClusteringResolution = None,
    device: Device = "auto",
    gpu: Gpu = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Annotate query cells with a trained model (streamed in batches)."""
    from hitanno_cli.prediction import predict

    if annotated_h5ad is not None and h5ad is None:
        raise UserError("--annotated-h5ad needs the query as --h5ad", "pass the query .h5ad with --h5ad")
    written = predict(
        model,
        output=output,
        sentences=sentences,
        h5ad=h5ad,
        label_key=label_key,
        min_confidence=min_confidence,
        batch_size=batch_size,
        min_coverage=min_coverage,
        layer=layer,
        majority_voting=majority_voting,
        over_clustering_resolution=over_clustering_resolution,
        device=device,
        gpu=gpu,
        overwrite=overwrite,
    )
    if annotated_h5ad is not None:
        from hitanno_cli.anndata_io import write_annotated_h5ad

        write_annotated_h5ad(h5ad, predictions_dir=written, output=annotated_h5ad, overwrite=overwrite)
        console.info(f"predict: annotated query → {annotated_h5ad}")


@command
def explain_cmd(
    model: Model,
    sentences: Annotated[Path, typer.Option("--sentences", "-s", help="Store encoded with the model's panel.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for attention tables and heatmaps.")],
    top_peaks: Annotated[int, typer.Option(help="Peaks listed per set and predicted type.")] = 20,
    max_cells: Annotated[int | None, typer.Option(help="Use a random sample of this many cells.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --max-cells sample.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Cells per batch.")] = 128,
    device: Device = "auto",
    gpu: Gpu = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Mean attention per predicted cell type: top peaks per set (level 1), set-to-set (level 2)."""
    from hitanno_cli.explanation import explain

    explain(
        model,
        sentences=sentences,
        output=output,
        top_peaks=top_peaks,
        max_cells=max_cells,
        seed=seed,
        batch_size=batch_size,
        device=device,
        gpu=gpu,
        overwrite=overwrite,
    )
