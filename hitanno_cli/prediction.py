"""``predict``: annotating query cells with a trained model, streamed in batches.

The query is either a sentence store (refused unless made with the model's panel) or
an ``.h5ad``, which is encoded through the model's own panel on the fly, chunk by
chunk; memory is bounded by one chunk. What is written is the predictions format
(:mod:`hitanno_cli.predictions`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hitanno_cli import artifacts, console, outputs, predictions
from hitanno_cli.batches import Batch, sequential_batches
from hitanno_cli.checkpoint import LoadedModel, load_model, read_adaptation
from hitanno_cli.errors import UserError
from hitanno_cli.h5ad import H5ad, check_counts
from hitanno_cli.host import keep_freed_memory
from hitanno_cli.runtime import autocast, resolve_device, to_device
from hitanno_cli.sentences import OpenRows, SentenceStore, chunk_cells_for, match_panel, pack_states, unpack_open


@dataclass
class Query:
    """Cells to annotate: ids, optional true labels, and a stream of batches."""

    source: Path
    n_cells: int
    cell_ids: np.ndarray
    labels: np.ndarray | None
    content_hash: str
    batches: Iterator[Batch]


def store_query(path: Path, loaded: LoadedModel, batch_size: int) -> Query:
    """A sentence store as a query, after checking it was written through the model's panel."""
    store = SentenceStore(path)
    store.check_panel(loaded.panel.content_hash)
    labels = store.labels()
    return Query(
        path, store.n_cells, store.cell_ids(), labels, store.content_hash, sequential_batches(store, None, batch_size)
    )


def h5ad_query(
    path: Path,
    loaded: LoadedModel,
    *,
    batch_size: int,
    label_key: str | None,
    min_coverage: float,
    layer: str | None,
) -> Query:
    """An ``.h5ad`` as a query, encoded through the model's panel as it is read."""
    panel = loaded.panel
    h5 = H5ad(path, layer=layer)
    try:  # checked before any work, the file closed on every refusal
        h5.check_not_empty()
        ids = h5.unique_obs_names().astype(object)
        labels = None
        if label_key is not None:
            labels = np.array(["" if v is None else v for v in h5.labels(label_key)], dtype=object)
        match = match_panel(panel, h5.unique_var_names(), lambda: h5.var)
        console.info(f"predict: {match.describe(path.name)}")
        if match.coverage < min_coverage:
            raise UserError(
                f"only {match.found} of {match.n_panel} panel peaks ({match.coverage:.1%}) are in "
                f"{path}, below --min-coverage {min_coverage}",
                "check that query and reference use the same genome build and peak coordinates",
            )
    except BaseException:
        h5.close()
        raise
    n_bytes = (panel.size + 7) // 8

    def batches() -> Iterator[Batch]:
        with h5:
            for row, counts in h5.iter_chunks(chunk_rows=max(chunk_cells_for(n_bytes), batch_size)):
                check_counts(counts.data, path, row)
                cells = unpack_open(pack_states(counts, match, n_bytes), panel.size)
                for lo in range(0, cells.n, batch_size):
                    sel = np.arange(lo, min(lo + batch_size, cells.n))
                    yield Batch(cells.take(sel), row + sel, None)

    return Query(path, h5.n_obs, ids, labels, artifacts.sha256_file(path), batches())


@torch.no_grad()
def run_model(
    loaded: LoadedModel, cells: OpenRows, device: torch.device, precision: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and cell embeddings (their logarithms) of a batch of cells.

    The embedding a cell gets is its log-probability vector over the reference types: the
    space the model decides in, holding the linear path's evidence too. The level-2 CLS
    output is not used: with the default recipe it is nearly the same for every cell
    (most of the signal reaches the logits through the linear path), and cell types do
    not form neighbourhoods in it (``docs/recipe.md``)."""
    indptr, positions = to_device(cells, device)
    with autocast(device, precision):
        out = loaded.model(indptr, positions)
    log_probs = torch.log_softmax(out.logits.float(), dim=1)
    return log_probs.exp().cpu().numpy(), log_probs.cpu().numpy()


def predict(
    model: str | Path,
    *,
    output: str | Path | None = None,
    sentences: str | Path | None = None,
    h5ad: str | Path | None = None,
    label_key: str | None = None,
    min_confidence: float = 0.0,
    batch_size: int = 256,
    min_coverage: float = 0.5,
    layer: str | None = None,
    majority_voting: bool = False,
    over_clustering_resolution: float | None = None,
    device: str = "auto",
    gpu: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Annotate the cells of a sentence store or an ``.h5ad`` with the model directory
    ``model``; write the predictions directory ``output`` (default: beside the query,
    ``query.zarr`` → ``query.predictions``).

    ``majority_voting`` also over-clusters the query on its cell embeddings and gives each
    cluster its most common label (:mod:`hitanno_cli.majority`), written beside the per-cell
    labels; ``over_clustering_resolution`` None takes the cell-count rule."""
    if (sentences is None) == (h5ad is None):
        raise UserError("pass exactly one query", "use --sentences STORE.zarr or --h5ad DATA.h5ad")
    if not 0.0 <= min_confidence <= 1.0:
        raise UserError(f"--min-confidence {min_confidence} is not a probability", "use a value in [0, 1]")
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1", "e.g. --batch-size 256")
    if not 0.0 <= min_coverage <= 1.0:  # also refuses nan
        raise UserError(f"--min-coverage {min_coverage} is not a share of the panel", "use a value in [0, 1]")
    if over_clustering_resolution is not None and not over_clustering_resolution > 0:
        raise UserError(
            f"--over-clustering-resolution {over_clustering_resolution:g} must be positive",
            "pass e.g. 5, or leave it out for the cell-count rule",
        )
    voting = VotingSettings(over_clustering_resolution) if majority_voting else None
    query_path = Path(sentences if sentences is not None else h5ad)
    output = outputs.default_output(query_path, ".predictions") if output is None else output
    with outputs.writing(output, kind=artifacts.PREDICTIONS, overwrite=overwrite, inputs=[model, query_path]) as out:
        return _predict(
            Path(model),
            out,
            query_path,
            from_store=sentences is not None,
            label_key=label_key,
            min_confidence=min_confidence,
            batch_size=batch_size,
            min_coverage=min_coverage,
            layer=layer,
            voting=voting,
            device=resolve_device(device, gpu),
        )


@dataclass(frozen=True)
class VotingSettings:
    """How ``--majority-voting`` over-clusters the query (None resolution: the cell-count rule)."""

    resolution: float | None = None
    n_neighbors: int = 15
    seed: int = 0

    def params(self) -> dict[str, Any]:
        """The settings as the predictions header records them."""
        return {"resolution": self.resolution, "n_neighbors": self.n_neighbors, "seed": self.seed}


def _predict(
    model: Path,
    out: Path,
    query_path: Path,
    *,
    from_store: bool,
    label_key: str | None,
    min_confidence: float,
    batch_size: int,
    min_coverage: float,
    layer: str | None,
    voting: VotingSettings | None,
    device: torch.device,
) -> Path:
    chosen = device
    keep_freed_memory()
    loaded = load_model(model, chosen)
    if from_store:
        query = store_query(query_path, loaded, batch_size)
    else:
        query = h5ad_query(
            query_path, loaded, batch_size=batch_size, label_key=label_key, min_coverage=min_coverage, layer=layer
        )
    if query.n_cells == 0:
        raise UserError(f"{query_path} has no cells", "pass a query with at least one cell")
    if voting is not None and query.n_cells < voting.n_neighbors:
        raise UserError(
            f"--majority-voting needs at least {voting.n_neighbors} cells; {query_path} has {query.n_cells}",
            "leave out --majority-voting for so small a query",
        )
    note_adaptation(model, query)
    params = {"min_confidence": min_confidence, "majority_voting": None if voting is None else voting.params()}
    with artifacts.atomic_dir(out, overwrite=True) as tmp:
        counts = write_predictions(tmp, loaded, query, chosen, params)
        if voting is not None:
            vote(tmp, voting)
    assigned = query.n_cells - counts[predictions.UNASSIGNED]
    console.info(f"predict: {query.n_cells} cells annotated ({assigned} assigned) → {out}")
    return out


def note_adaptation(model_dir: Path, query: Query) -> None:
    """Say so when a model self-trained on one query (train --adapt-to) annotates another."""
    record = read_adaptation(model_dir)
    if record is None or record["header"]["inputs"].get("query") == query.content_hash:
        return
    message = f"predict: {model_dir} was self-trained on the query {record['query']}"
    if query.source.suffix == ".h5ad":  # an .h5ad's hash is its file's: the store's cannot be compared
        console.info(message + "; it is specific to that query")
    else:
        console.warn(message + ", not on this one: its predictions here are a model adapted to other cells")


def vote(directory: Path, settings: VotingSettings) -> None:
    """Majority voting over the cell embeddings just written to ``directory``, added to it."""
    from hitanno_cli.majority import majority_vote

    ids, embeddings = predictions.read_array(directory, "embeddings")
    labels = predictions.read_predictions(directory / predictions.CSV).predicted
    with console.progress("predict: majority voting (kNN graph, Leiden)", None, unit=""):
        result = majority_vote(
            embeddings,
            labels,
            n_neighbors=settings.n_neighbors,
            resolution=settings.resolution,
            seed=settings.seed,
        )
    predictions.add_majority_voting(
        directory,
        cell_ids=ids,
        clusters=result.clusters,
        labels=result.labels,
        confidence=result.confidence,
        summary={"resolution": result.resolution, "n_clusters": result.n_clusters},
    )
    changed = int((result.labels != labels).sum())
    console.info(
        f"predict: majority voting over {result.n_clusters} clusters (resolution {result.resolution:g}) "
        f"relabels {changed} of {len(labels)} cells"
    )


def write_predictions(
    tmp: Path, loaded: LoadedModel, query: Query, device: torch.device, params: dict[str, Any]
) -> dict[str, int]:
    """Stream the query through the model into the predictions directory; count labels given."""
    inputs = {"model": loaded.content_hash, "query": query.content_hash}
    min_confidence = params["min_confidence"]
    header = artifacts.make_header(artifacts.PREDICTIONS, params, inputs)
    with (
        predictions.PredictionsWriter(
            tmp,
            header=header,
            class_names=loaded.class_names,
            cell_ids=query.cell_ids,
            with_truth=query.labels is not None,
        ) as writer,
        console.progress("predict", query.n_cells) as bar,
    ):
        for batch in query.batches:
            probabilities, embeddings = run_model(loaded, batch.open, device)
            writer.add(
                query.cell_ids[batch.rows],
                probabilities=probabilities,
                embeddings=embeddings,
                min_confidence=min_confidence,
                truth=None if query.labels is None else query.labels[batch.rows],
            )
            bar.advance(len(batch.rows))
    return writer.given
