"""``explain``: what a trained model attends to, per predicted cell type.

Cells are grouped by their *predicted* type. Per group the head-averaged attention is
averaged over cells:

* level 1 — each set token's attention to its ``P`` peaks; the ``--top-peaks`` peaks of
  every set are listed with genomic coordinates (co-accessible markers inside a set);
* level 2 — attention among ``[CLS, set summaries]`` (dependencies between peak sets).

Outputs, in one directory written atomically: ``level1_top_peaks.csv``,
``level2_attention.csv`` (long form), ``level2_cls.csv`` (predicted type × peak set,
CLS's attention), ``level2_cls.png`` and ``level2_heatmaps.png``, and ``summary.json``
with the header and the cell count per predicted type.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

from hitanno_cli import artifacts, console, outputs
from hitanno_cli.batches import sequential_batches
from hitanno_cli.checkpoint import LoadedModel, load_model
from hitanno_cli.errors import UserError
from hitanno_cli.plotting import pyplot
from hitanno_cli.runtime import autocast, resolve_device, to_device
from hitanno_cli.sentences import SentenceStore


class AttentionSums:
    """Running sums of attention per predicted type (float64, so order barely matters)."""

    def __init__(self, n_types: int, peaks_per_type: int) -> None:
        self.level1 = np.zeros((n_types, n_types, peaks_per_type))
        self.level2 = np.zeros((n_types, n_types + 1, n_types + 1))
        self.cells = np.zeros(n_types, dtype=np.int64)

    def add(self, predicted: np.ndarray, level1: np.ndarray, level2: np.ndarray) -> None:
        """Add one batch's per-cell attention under each cell's predicted type."""
        one_hot = np.zeros((len(self.cells), len(predicted)))
        one_hot[predicted, np.arange(len(predicted))] = 1.0  # the sums as one product each
        self.level1 += (one_hot @ level1.reshape(len(predicted), -1)).reshape(self.level1.shape)
        self.level2 += (one_hot @ level2.reshape(len(predicted), -1)).reshape(self.level2.shape)
        self.cells += np.bincount(predicted, minlength=len(self.cells))

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean attention per predicted type (zeros for types never predicted)."""
        n = np.maximum(self.cells, 1).astype(np.float64)
        return self.level1 / n[:, None, None], self.level2 / n[:, None, None]


@torch.no_grad()
def collect(
    loaded: LoadedModel, store: SentenceStore, rows: np.ndarray | None, batch_size: int, device: torch.device
) -> AttentionSums:
    """Run the model with attention over the chosen cells and sum it per predicted type."""
    sums = AttentionSums(loaded.config.n_types, loaded.config.peaks_per_type)
    total = store.n_cells if rows is None else len(rows)
    with console.progress("explain", total) as bar:
        for batch in sequential_batches(store, rows, batch_size):
            indptr, positions = to_device(batch.open, device)
            with autocast(device, "auto"):
                out = loaded.model(indptr, positions, return_attention=True)
            predicted = out.logits.float().argmax(1).cpu().numpy()
            sums.add(
                predicted,
                out.level1_attention.float().cpu().numpy().astype(np.float64),
                out.level2_attention.float().cpu().numpy().astype(np.float64),
            )
            bar.advance(len(batch.rows))
    return sums


def write_top_peaks(path: Path, loaded: LoadedModel, sums: AttentionSums, level1: np.ndarray, top: int) -> None:
    """``predicted_type, n_cells, peak_set, rank, peak, chrom, start, end, attention``."""
    names = loaded.class_names
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["predicted_type", "n_cells", "peak_set", "rank", "peak", "chrom", "start", "end", "attention"])
        for c in np.flatnonzero(sums.cells):
            for t, peak_set in enumerate(loaded.panel.sets):
                order = np.argsort(-level1[c, t], kind="stable")[:top]
                for rank, j in enumerate(order, start=1):
                    writer.writerow(
                        [
                            names[c],
                            sums.cells[c],
                            peak_set.cell_type,
                            rank,
                            peak_set.names[j],
                            peak_set.chrom[j],
                            peak_set.start[j],
                            peak_set.end[j],
                            f"{level1[c, t, j]:.6g}",
                        ]
                    )


def write_level2(out: Path, loaded: LoadedModel, sums: AttentionSums, level2: np.ndarray) -> None:
    """Level-2 attention in long form, and CLS's row as a predicted-type × set table."""
    tokens = ["CLS"] + loaded.class_names
    predicted = np.flatnonzero(sums.cells)
    with open(out / "level2_attention.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["predicted_type", "n_cells", "from", "to", "attention"])
        for c in predicted:
            for i, source in enumerate(tokens):
                for j, target in enumerate(tokens):
                    writer.writerow([loaded.class_names[c], sums.cells[c], source, target, f"{level2[c, i, j]:.6g}"])
    with open(out / "level2_cls.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["predicted_type", "n_cells", "CLS"] + loaded.class_names)
        for c in predicted:
            writer.writerow([loaded.class_names[c], sums.cells[c]] + [f"{v:.6g}" for v in level2[c, 0]])


#: At most this many per-type level-2 maps are drawn (the most predicted types); with
#: more tokens than :data:`MAX_TICK_LABELS` the maps carry no tick labels. The CSVs hold all.
MAX_HEATMAPS = 16
MAX_TICK_LABELS = 40
#: The CLS map grows with the types up to this many inches a side (then its labels shrink).
MAX_INCHES = 24.0


def most_predicted(cells: np.ndarray, limit: int) -> np.ndarray:
    """The (at most ``limit``) types predicted for the most cells, most first; ties in panel order."""
    predicted = np.flatnonzero(cells)
    return predicted[np.argsort(-cells[predicted], kind="stable")[:limit]]


def plot_heatmaps(out: Path, loaded: LoadedModel, sums: AttentionSums, level2: np.ndarray) -> None:
    """``level2_cls.png`` (CLS → sets per predicted type) and one level-2 map per type."""
    plt = pyplot()
    names, predicted = loaded.class_names, np.flatnonzero(sums.cells)
    tokens = ["CLS"] + names
    size = min(MAX_INCHES, max(4.0, 0.35 * len(tokens) + 2))
    fig, ax = plt.subplots(figsize=(size + 1, min(MAX_INCHES, max(2.5, 0.35 * len(predicted) + 1.5))))
    image = ax.imshow(level2[predicted, 0, :], aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
    ax.set_yticks(range(len(predicted)), [f"{names[c]} (n={sums.cells[c]})" for c in predicted], fontsize=7)
    ax.set_xlabel("token attended to (level 2)")
    ax.set_ylabel("predicted type")
    ax.set_title("CLS attention to peak sets")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "level2_cls.png", dpi=120)
    plt.close(fig)
    shown = most_predicted(sums.cells, MAX_HEATMAPS)
    cols = math.ceil(math.sqrt(len(shown)))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    labelled = len(tokens) <= MAX_TICK_LABELS
    for ax, c in zip(axes.flat, shown):
        ax.imshow(level2[c], cmap="viridis", vmin=0)
        ax.set_title(f"{names[c]} (n={sums.cells[c]})", fontsize=8)
        if labelled:
            ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=5)
            ax.set_yticks(range(len(tokens)), tokens, fontsize=5)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    title = "level-2 attention among [CLS, peak sets] (row attends to column)"
    if len(shown) < len(predicted):
        title += f"\nthe {len(shown)} most predicted of {len(predicted)} types; all are in level2_attention.csv"
    if not labelled:
        title += f"\ntokens in panel order: CLS, then {', '.join(names[:3])}, …"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "level2_heatmaps.png", dpi=120)
    plt.close(fig)


def explain(
    model: str | Path,
    *,
    sentences: str | Path,
    output: str | Path,
    top_peaks: int = 20,
    max_cells: int | None = None,
    seed: int = 0,
    batch_size: int = 128,
    device: str = "auto",
    gpu: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the mean attention per predicted type of a sentence store's cells to ``output``."""
    if top_peaks < 1:
        raise UserError("--top-peaks must be at least 1", "e.g. --top-peaks 20")
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1", "e.g. --batch-size 128")
    if max_cells is not None and max_cells < 1:
        raise UserError(f"--max-cells {max_cells} must be at least 1", "e.g. --max-cells 5000, or leave it out")
    with outputs.writing(output, kind=artifacts.ATTENTION, overwrite=overwrite, inputs=[model, sentences]) as out:
        return _explain(
            Path(model),
            Path(sentences),
            out,
            top_peaks=top_peaks,
            max_cells=max_cells,
            seed=seed,
            batch_size=batch_size,
            device=resolve_device(device, gpu),
        )


def _explain(
    model: Path,
    sentences: Path,
    out: Path,
    *,
    top_peaks: int,
    max_cells: int | None,
    seed: int,
    batch_size: int,
    device: torch.device,
) -> Path:
    chosen = device
    loaded = load_model(model, chosen)
    store = SentenceStore(sentences)
    store.check_panel(loaded.panel.content_hash)
    if store.n_cells == 0:
        raise UserError(f"{sentences} has no cells", "pass a store with at least one cell")
    rows = None
    if max_cells is not None and max_cells < store.n_cells:
        rows = np.sort(np.random.default_rng(seed).choice(store.n_cells, max_cells, replace=False))
    sums = collect(loaded, store, rows, batch_size, chosen)
    level1, level2 = sums.means()
    top = min(top_peaks, loaded.config.peaks_per_type)
    params = {"top_peaks": top, "max_cells": max_cells, "seed": seed}
    inputs = {"model": loaded.content_hash, "sentences": store.content_hash}
    with artifacts.atomic_dir(out, overwrite=True) as tmp:
        write_top_peaks(tmp / "level1_top_peaks.csv", loaded, sums, level1, top)
        write_level2(tmp, loaded, sums, level2)
        plot_heatmaps(tmp, loaded, sums, level2)
        summary = {
            "header": artifacts.make_header(artifacts.ATTENTION, params, inputs),
            "cells_per_predicted_type": {loaded.class_names[c]: int(n) for c, n in enumerate(sums.cells)},
        }
        artifacts.write_verified_json(tmp / "summary.json", summary)
    console.info(f"explain: attention of {int(sums.cells.sum())} cells → {out}")
    return out
