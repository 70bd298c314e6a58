"""``evaluate``: metrics, pictures and an HTML report of predictions against known labels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from rich.table import Table

from hitanno_cli import artifacts, console
from hitanno_cli.commands.common import Overwrite, Quiet, command
from hitanno_cli.evaluation import align_truth, read_embeddings, read_predictions, read_truth, score

#: Cells drawn for the 2-D map (it is a picture: more would only slow it down).
MAP_CELLS = 30_000


def evaluate(predictions: Path, truth: Path, label_key: str | None, out: Path,
             overwrite: bool = False, embedding_map: bool = True) -> dict[str, Any]:
    """Score ``predictions`` against ``truth`` and write ``out/`` (metrics, PNGs, report.html)."""
    from hitanno_cli import report

    preds = read_predictions(predictions)
    truth_ids, truth_labels = read_truth(truth, label_key)
    truth_aligned = align_truth(preds.cell_ids, truth_ids, truth_labels)
    metrics = score(truth_aligned, preds.predicted, preds.class_names)
    inputs = {"predictions": artifacts.sha256_file(predictions), "truth": _identity(truth)}
    metrics = {"header": artifacts.make_header(artifacts.EVALUATION, {"label_key": label_key}, inputs), **metrics}
    with artifacts.atomic_dir(out, overwrite) as tmp:
        images = [(report.confusion_heatmap(metrics, tmp / "confusion.png"), "Confusion matrix, row-normalised"),
                  (report.f1_bars(metrics, tmp / "f1_per_type.png"), "Per-type F1, ordered by type size")]
        embeddings = read_embeddings(preds.directory, preds.cell_ids) if embedding_map else None
        if embeddings is not None:
            pick = np.random.default_rng(0).permutation(len(embeddings))[:MAP_CELLS]
            coords, method = report.two_d(embeddings[pick])
            metrics["embedding_map"] = method
            images.append((report.embedding_map(coords, truth_aligned[pick], preds.predicted[pick], method,
                                                tmp / "embedding_map.png"), f"{method}: true and predicted types"))
        artifacts.write_json(tmp / "metrics.json", metrics)
        report.write_html(metrics, images, tmp / "report.html", f"hitanno evaluation: {predictions}")
    return metrics


def _identity(path: Path) -> str:
    if (path / "zarr.json").is_file():
        from hitanno_cli.sentences import SentenceStore

        return SentenceStore(path).content_hash
    return artifacts.sha256_file(path)


def print_summary(metrics: dict[str, Any], out: Path) -> None:
    """The headline metrics as a rich table on stderr."""
    table = Table(title="hitanno evaluate", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("accuracy", "macro_f1", "weighted_f1", "kappa", "accuracy_including_unassigned"):
        table.add_row(key, f"{metrics[key]:.4f}")
    table.add_row("cells scored", f"{metrics['n_scored']} / {metrics['n_cells']}")
    table.add_row("unseen-type cells", str(metrics["unseen_types"]["n"]))
    table.add_row("unassigned cells", str(metrics["unassigned"]["n"]))
    if not console.is_quiet():
        console.stderr.print(table)
    console.info(f"evaluate: report → {out / 'report.html'}")


@command
def evaluate_cmd(
    predictions: Annotated[Path, typer.Option("--predictions", help="predictions.csv written by hitanno predict.")],
    truth: Annotated[Path, typer.Option("--truth", help="Known labels: a labelled sentence store or an .h5ad.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Report directory to write.")],
    label_key: Annotated[Optional[str], typer.Option("--label-key", "-l", help="obs column of true types (.h5ad truth).")] = None,
    embedding_map: Annotated[bool, typer.Option(help="Draw the 2-D map of cell embeddings (UMAP, else PCA).")] = True,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Score predictions: metrics.json, confusion heatmap, per-type F1, embedding map, report.html."""
    artifacts.refuse_existing(output, overwrite)
    metrics = evaluate(predictions, truth, label_key, output, overwrite, embedding_map)
    print_summary(metrics, output)
