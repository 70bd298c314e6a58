"""Pictures and a self-contained HTML report of an evaluation.

The PNGs are written beside ``metrics.json`` and embedded in ``report.html`` as data
URIs, so the report opens in any browser with no network and no other file.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hitanno_cli.plotting import pyplot

plt = pyplot()


def _types_by_size(metrics: dict[str, Any]) -> list[str]:
    per_type = metrics["per_type"]
    return sorted(per_type, key=lambda t: (-per_type[t]["support"], t))


def confusion_heatmap(metrics: dict[str, Any], path: Path) -> Path:
    """Row-normalised confusion matrix (true types in rows), types ordered by size."""
    labels = metrics["confusion"]["labels"]
    matrix = np.array(metrics["confusion"]["matrix"], dtype=float)
    order = [labels.index(t) for t in _types_by_size(metrics)]
    matrix = matrix[np.ix_(order, order)]
    rows = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    names = [labels[i] for i in order]
    size = 2.5 + 0.38 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(names) <= 25:
        for i in range(len(names)):
            for j in range(len(names)):
                if norm[i, j] >= 0.01:
                    ax.text(
                        j,
                        i,
                        f"{norm[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if norm[i, j] > 0.6 else "black",
                    )
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of true type")
    ax.set_title("Confusion matrix (row-normalised)")
    return _save(fig, path)


def f1_bars(metrics: dict[str, Any], path: Path) -> Path:
    """Per-type F1, types ordered by size (largest first), support in the labels."""
    per_type = metrics["per_type"]
    names = _types_by_size(metrics)
    fig, ax = plt.subplots(figsize=(max(5, 0.4 * len(names) + 2), 4))
    ax.bar(range(len(names)), [per_type[t]["f1"] for t in names], color="#3b75af")
    ax.set_xticks(range(len(names)), [f"{t} ({per_type[t]['support']})" for t in names], rotation=90, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.axhline(metrics["macro_f1"], color="#c44e52", linestyle="--", label=f"macro-F1 {metrics['macro_f1']:.3f}")
    ax.legend(loc="lower left")
    ax.set_title("Per-type F1 (by type size)")
    return _save(fig, path)


#: Entries per column of the embedding map's legend.
LEGEND_ROWS = 40


def embedding_map(coords: np.ndarray, truth: np.ndarray, predicted: np.ndarray, method: str, path: Path) -> Path:
    """Two scatter plots of the 2-D map: coloured by true and by predicted type."""
    names = sorted(set(truth.tolist()) | set(predicted.tolist()))
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    colour = {n: cmap(i % cmap.N) for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, labels, title in ((axes[0], truth, "true type"), (axes[1], predicted, "predicted type")):
        for name in names:
            mask = labels == name
            if mask.any():
                ax.scatter(coords[mask, 0], coords[mask, 1], s=3, color=colour[name], label=name, linewidths=0)
        ax.set_title(f"{method} of cell embeddings — {title}")
        ax.set_xticks([])
        ax.set_yticks([])
    columns = math.ceil(len(names) / LEGEND_ROWS)  # many types: the legend grows sideways, not off the page
    axes[1].legend(
        markerscale=4, fontsize=7 if columns == 1 else 5, ncol=columns,
        loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
    )  # fmt: skip
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    text = html.escape(alt)
    return f'<figure><img alt="{text}" src="data:image/png;base64,{data}"><figcaption>{text}</figcaption></figure>'


def _called(counts: dict[str, int]) -> str:
    """``"B: 7, C: 2"``: what cells were called, most often first."""
    return ", ".join(f"{k}: {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def write_html(
    metrics: dict[str, Any], images: list[tuple[Path, str]], path: Path, *, title: str, headline: Sequence[str]
) -> Path:
    """One self-contained HTML page: the ``headline`` metrics, per-type table, pictures,
    and the cells reported apart (unseen types, Unassigned)."""
    e = html.escape
    head_rows = "".join(f"<tr><th>{e(k)}</th><td>{_fmt(metrics[k])}</td></tr>" for k in headline)
    head_rows += f"<tr><th>cells scored</th><td>{metrics['n_scored']} of {metrics['n_cells']}</td></tr>"
    per_type = metrics["per_type"]
    type_rows = "".join(
        f"<tr><td>{e(t)}</td><td>{per_type[t]['support']}</td><td>{per_type[t]['precision']:.3f}</td>"
        f"<td>{per_type[t]['recall']:.3f}</td><td>{per_type[t]['f1']:.3f}</td></tr>"
        for t in _types_by_size(metrics)
    )
    unseen = metrics["unseen_types"]
    unseen_rows = (
        "".join(
            f"<tr><td>{e(t)}</td><td>{v['n']}</td><td>{e(_called(v['predicted_as']))}</td></tr>"
            for t, v in unseen["by_type"].items()
        )
        or "<tr><td colspan=3>none</td></tr>"
    )
    unassigned = metrics["unassigned"]
    unassigned_rows = (
        "".join(f"<tr><td>{e(t)}</td><td>{n}</td></tr>" for t, n in sorted(unassigned["by_true_type"].items()))
        or "<tr><td colspan=2>none</td></tr>"
    )
    figures = "".join(_img(p, alt) for p, alt in images)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }}
th {{ background: #f3f3f3; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }}
figcaption {{ color: #666; font-size: 0.9em; }}
</style></head><body>
<h1>{e(title)}</h1>
<h2>Headline metrics</h2>
<table id="headline">{head_rows}</table>
<p>Scored: cells with a known true type and an assigned prediction. Cells of types the
reference never had, and cells left <code>Unassigned</code>, are listed apart below.</p>
{figures}
<h2>Per type</h2>
<table id="per-type">
<tr><th>type</th><th>support</th><th>precision</th><th>recall</th><th>F1</th></tr>{type_rows}</table>
<h2>Types the reference never had ({unseen["n"]} cells)</h2>
<table><tr><th>true type</th><th>cells</th><th>predicted as</th></tr>{unseen_rows}</table>
<h2>Unassigned cells of known types ({unassigned["n"]})</h2>
<table><tr><th>true type</th><th>cells</th></tr>{unassigned_rows}</table>
</body></html>
"""
    path.write_text(page, encoding="utf-8")
    return path
