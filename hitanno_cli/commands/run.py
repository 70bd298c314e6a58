"""``run``: the whole pipeline in one command, skipping stages that are up to date."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hitanno_cli import artifacts, console
from hitanno_cli.commands.annotate import MajorityVoting, OverClusteringResolution
from hitanno_cli.commands.common import Quiet, command, split_list
from hitanno_cli.pipeline import OUTPUTS, STAGES, RunSettings, run
from hitanno_cli.training.options import PSEUDO_LABEL_FRACTION


@command
def run_cmd(
    ref: Annotated[Path, typer.Option("--ref", help="Labelled reference .h5ad (raw counts).")],
    query: Annotated[Path, typer.Option("--query", help="Query .h5ad to annotate (labels optional).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for every artifact and run.json.")],
    label_key: Annotated[
        str | None,
        typer.Option(
            "--label-key", "-l", help="obs column of cell types. Default: the one named cell_type, celltype, label, …"
        ),
    ] = None,
    from_stage: Annotated[
        str | None, typer.Option("--from", help=f"Rerun this stage and all after it: {', '.join(STAGES)}.")
    ] = None,
    peaks_per_type: Annotated[int | None, typer.Option(help="Peaks per type (default: published formula).")] = None,
    min_cells: Annotated[int, typer.Option(help="Refuse reference types with fewer cells.")] = 10,
    exclude_types: Annotated[str | None, typer.Option(help="Comma-separated types to leave out.")] = None,
    min_coverage: Annotated[float, typer.Option(help="Refuse a query holding less of the panel.")] = 0.5,
    recipe: Annotated[str, typer.Option(help="Training recipe: default or published (see hitanno train).")] = "default",
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default: hitanno train's).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Training batch size (default: hitanno train's).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: hitanno train's).")] = None,
    class_weight: Annotated[str | None, typer.Option(help="none or balanced (default: hitanno train's).")] = None,
    seed: Annotated[int | None, typer.Option(help="Training seed (default: hitanno train's).")] = None,
    train_option: Annotated[
        list[str] | None, typer.Option(help="Any other hitanno train option as KEY=VALUE (repeatable).")
    ] = None,
    self_train: Annotated[
        bool,
        typer.Option(
            "--self-train/--no-self-train",
            help="Self-train on the query (hitanno train --adapt-to): pseudo-label its most confident "
            "cells and train again on both. On by default: it raised macro-F1 on every benchmark setting.",
        ),
    ] = True,
    pseudo_label_fraction: Annotated[
        float,
        typer.Option(help="With --self-train: share of each predicted type's query cells that are pseudo-labelled."),
    ] = PSEUDO_LABEL_FRACTION,
    min_confidence: Annotated[float, typer.Option(help="Unassigned below this probability.")] = 0.0,
    majority_voting: MajorityVoting = False,
    over_clustering_resolution: OverClusteringResolution = None,
    annotated_h5ad: Annotated[
        bool,
        typer.Option(
            "--annotated-h5ad/--no-annotated-h5ad",
            help="Write annotated.h5ad: a copy of the query with the results in obs, obsm and uns.",
        ),
    ] = True,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda:N.")] = "auto",
    gpu: Annotated[int | None, typer.Option(help="Shorthand for --device cuda:N.")] = None,
    quiet: Quiet = False,
) -> None:
    """Run select-peaks → encode → train → predict → annotate → evaluate, skipping up-to-date stages."""
    from hitanno_cli.training import options_with_assignments

    named = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "class_weight": class_weight, "seed": seed}
    options = options_with_assignments(recipe, named, train_option or [])
    settings = RunSettings(
        peaks_per_type=peaks_per_type,
        min_cells=min_cells,
        exclude_types=split_list(exclude_types),
        min_coverage=min_coverage,
        min_confidence=min_confidence,
        device=device,
        gpu=gpu,
        train=options,
        pseudo_label_fraction=pseudo_label_fraction if self_train else None,
        majority_voting=majority_voting,
        over_clustering_resolution=over_clustering_resolution,
        annotated_h5ad=annotated_h5ad,
    )
    manifest = run(ref, query=query, label_key=label_key, output=output, settings=settings, from_stage=from_stage)
    ran = [name for name, s in manifest["stages"].items() if s["status"] == "ran"]
    console.info(f"run: ran {', '.join(ran) or 'nothing (all up to date)'}; manifest → {output / 'run.json'}")
    if "annotate" in manifest["stages"]:
        console.info(f"run: annotated query → {output / OUTPUTS['annotate']}")
    if "evaluate" in manifest["stages"]:
        from hitanno_cli.commands.evaluate import print_summary

        report = output / OUTPUTS["evaluate"]
        metrics = artifacts.read_verified_json(
            report / "metrics.json", artifacts.EVALUATION, fix="rerun with --from evaluate"
        )
        print_summary(metrics, report)
    else:
        from hitanno_cli import predictions

        console.info(f"run: predictions → {output / OUTPUTS['predict'] / predictions.CSV}")
