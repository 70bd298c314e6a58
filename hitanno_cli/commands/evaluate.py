"""``evaluate``: metrics, pictures and an HTML report of predictions against known labels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from hitanno_cli import console
from hitanno_cli.commands.common import Overwrite, Quiet, command


def print_summary(metrics: dict[str, Any], out: Path) -> None:
    """The headline metrics as a rich table on stderr."""
    from hitanno_cli.evaluation import HEADLINE

    table = Table(title="hitanno evaluate", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in HEADLINE:
        table.add_row(key, "n/a" if metrics[key] is None else f"{metrics[key]:.4f}")
    table.add_row("cells scored", f"{metrics['n_scored']} / {metrics['n_cells']}")
    table.add_row("unseen-type cells", str(metrics["unseen_types"]["n"]))
    table.add_row("unassigned cells", str(metrics["unassigned"]["n"]))
    voted = metrics.get("majority_voting")
    if voted is not None:
        for key in ("accuracy", "macro_f1"):
            table.add_row(f"{key}, majority voting", "n/a" if voted[key] is None else f"{voted[key]:.4f}")
    if not console.is_quiet():
        console.stderr.print(table)
    console.info(f"evaluate: report → {out / 'report.html'}")


@command
def evaluate_cmd(
    predictions: Annotated[Path, typer.Option("--predictions", help="predictions.csv written by hitanno predict.")],
    truth: Annotated[Path, typer.Option("--truth", help="Known labels: a labelled sentence store or an .h5ad.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Report directory to write.")],
    label_key: Annotated[
        str | None,
        typer.Option(
            "--label-key", "-l", help="obs column of true types (.h5ad truth; default: the one named like cell_type)."
        ),
    ] = None,
    embedding_map: Annotated[bool, typer.Option(help="Draw the 2-D map of cell embeddings (UMAP, else PCA).")] = True,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Score predictions: metrics.json, confusion heatmap, per-type F1, embedding map, report.html."""
    from hitanno_cli.evaluation import evaluate  # scikit-learn loads only when scoring

    metrics = evaluate(
        predictions, truth=truth, output=output, label_key=label_key, embedding_map=embedding_map, overwrite=overwrite
    )
    print_summary(metrics, output)
