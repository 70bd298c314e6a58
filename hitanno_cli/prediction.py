"""Annotating query cells with a trained model, streamed in batches.

The query is either a sentence store (refused unless made with the model's panel) or
an ``.h5ad``, which is encoded through the model's own panel on the fly, chunk by
chunk; memory is bounded by one chunk. Outputs, in one directory written atomically:

* ``predictions.csv`` — ``cell_id, predicted, probability`` (and ``true_label`` when
  the query has labels); ``Unassigned`` where the probability is below
  ``--min-confidence``;
* ``probabilities.zarr`` — the full ``[cells, n_types]`` probability matrix (float32);
* ``embeddings.zarr`` — the ``[cells, embed_dim]`` cell embeddings (float32).

Both zarr stores hold ``cell_ids`` and a format header in their attributes.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from hitanno_cli import artifacts, console
from hitanno_cli.allocator import keep_freed_memory
from hitanno_cli.batches import Batch, OpenRows, open_from_packed, sequential_batches
from hitanno_cli.checkpoint import ADAPTATION, LoadedModel, load_model
from hitanno_cli.errors import UserError
from hitanno_cli.h5ad import H5ad, check_counts
from hitanno_cli.sentences import SentenceStore, chunk_cells_for, match_panel, pack_states
from hitanno_cli.training import autocast, resolve_device

UNASSIGNED = artifacts.UNASSIGNED
#: Rows per chunk of the probability and embedding arrays.
OUTPUT_CHUNK_ROWS = 16384


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
    return Query(path, store.n_cells, store.cell_ids(), labels, store.content_hash,
                 sequential_batches(store, None, batch_size))


def h5ad_query(path: Path, loaded: LoadedModel, batch_size: int, label_key: str | None,
               min_coverage: float, layer: str | None) -> Query:
    """An ``.h5ad`` as a query, encoded through the model's panel as it is read."""
    panel = loaded.panel
    h5 = H5ad(path, layer=layer)
    labels = None
    if label_key is not None:
        raw = h5.labels(label_key)
        labels = np.array(["" if v is None else v for v in raw], dtype=object)
    match = match_panel(panel, h5.unique_var_names(), lambda: h5.var)
    console.info(f"predict: {match.found}/{match.n_panel} panel peaks found in {path.name} "
                 f"({match.by_name} by name, {match.by_overlap} by overlap)")
    if match.coverage < min_coverage:
        h5.close()
        raise UserError(f"only {match.found} of {match.n_panel} panel peaks ({match.coverage:.1%}) are in "
                        f"{path}, below --min-coverage {min_coverage}",
                        "check that query and reference use the same genome build and peak coordinates")
    n_bytes = (panel.size + 7) // 8

    def batches() -> Iterator[Batch]:
        with h5:
            for row, counts in h5.iter_chunks(chunk_rows=max(chunk_cells_for(n_bytes), batch_size)):
                check_counts(counts.data, path, row)
                cells = open_from_packed(pack_states(counts, match, n_bytes), panel.size)
                for lo in range(0, cells.n, batch_size):
                    sel = np.arange(lo, min(lo + batch_size, cells.n))
                    yield Batch(cells.take(sel), row + sel, None)

    return Query(path, h5.n_obs, h5.obs_names().astype(object), labels, artifacts.sha256_file(path), batches())


@torch.no_grad()
def run_model(loaded: LoadedModel, cells: OpenRows, device: torch.device,
              precision: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and embeddings of a batch of cells."""
    indptr = torch.from_numpy(cells.indptr).to(device)
    positions = torch.from_numpy(cells.positions).to(device)
    with autocast(device, precision):
        out = loaded.model(indptr, positions)
    probs = torch.softmax(out.logits.float(), dim=1)
    return probs.cpu().numpy(), out.embedding.float().cpu().numpy()


class RowWriter:
    """Appends rows to a float32 zarr array, writing whole chunks only (no rewrites)."""

    def __init__(self, path: Path, name: str, shape: tuple[int, int], cell_ids: np.ndarray,
                 attrs: dict[str, Any], chunk_rows: int = OUTPUT_CHUNK_ROWS) -> None:
        group = zarr.open_group(path, mode="w", zarr_format=3)
        group.attrs["hitanno"] = attrs
        ids = np.asarray(cell_ids, dtype=str)
        artifacts.write_strings(group, "cell_ids", ids)
        self.chunk_rows = max(1, min(shape[0], chunk_rows))
        self.array = group.create_array(name, shape=shape, chunks=(self.chunk_rows, shape[1]), dtype="float32",
                                        config={"write_empty_chunks": True})  # skip zarr's slow all-fill check
        self.pending: list[np.ndarray] = []
        self.written = 0

    def append(self, block: np.ndarray) -> None:
        """Queue rows; write every chunk that is complete."""
        self.pending.append(block.astype(np.float32))
        if sum(len(b) for b in self.pending) >= self.chunk_rows:
            self.flush(whole_chunks=True)

    def flush(self, whole_chunks: bool = False) -> None:
        """Write queued rows (only whole chunks unless at the end)."""
        rows = np.concatenate(self.pending) if self.pending else np.zeros((0, self.array.shape[1]), np.float32)
        n = len(rows) // self.chunk_rows * self.chunk_rows if whole_chunks else len(rows)
        if n:
            self.array[self.written:self.written + n] = rows[:n]
            self.written += n
        self.pending = [rows[n:]] if n < len(rows) else []


def predict(model_dir: str | Path, out: str | Path, sentences: str | Path | None = None,
            h5ad: str | Path | None = None, label_key: str | None = None, batch_size: int = 256,
            min_confidence: float = 0.0, device: str = "auto", gpu: int | None = None,
            min_coverage: float = 0.5, layer: str | None = None, overwrite: bool = False) -> Path:
    """Annotate the cells of a sentence store or an ``.h5ad``; write ``out/``."""
    if (sentences is None) == (h5ad is None):
        raise UserError("pass exactly one query", "use --sentences STORE.zarr or --h5ad DATA.h5ad")
    if not 0.0 <= min_confidence <= 1.0:
        raise UserError(f"--min-confidence {min_confidence} is not a probability", "use a value in [0, 1]")
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1", "e.g. --batch-size 256")
    out = Path(out)
    artifacts.refuse_existing(out, overwrite)
    chosen = resolve_device(device, gpu)
    keep_freed_memory()
    loaded = load_model(model_dir, chosen)
    if sentences is not None:
        query = store_query(Path(sentences), loaded, batch_size)
    else:
        query = h5ad_query(Path(h5ad), loaded, batch_size, label_key, min_coverage, layer)
    note_adaptation(Path(model_dir), query)
    with artifacts.atomic_dir(out, overwrite) as tmp:
        counts = write_predictions(tmp, loaded, query, chosen, min_confidence)
    assigned = query.n_cells - counts[UNASSIGNED]
    console.info(f"predict: {query.n_cells} cells annotated ({assigned} assigned) → {out}")
    return out


def note_adaptation(model_dir: Path, query: Query) -> None:
    """Say so when a model self-trained on one query (train --adapt-to) annotates another."""
    record_file = model_dir / ADAPTATION
    if not record_file.is_file():
        return
    record = artifacts.read_json(record_file, "adaptation record")
    if record["header"]["inputs"].get("query") == query.content_hash:
        return
    message = f"predict: {model_dir} was self-trained on the query {record['query']}"
    if query.source.suffix == ".h5ad":  # an .h5ad's hash is its file's: the store's cannot be compared
        console.info(message + "; it is specific to that query")
    else:
        console.warn(message + ", not on this one: its predictions here are a model adapted to other cells")


def write_predictions(tmp: Path, loaded: LoadedModel, query: Query, device: torch.device,
                      min_confidence: float) -> dict[str, int]:
    """Stream the query through the model into the three outputs; count labels given."""
    names = np.array(loaded.class_names, dtype=object)
    inputs = {"model": loaded.content_hash, "query": query.content_hash}
    header = artifacts.make_header(artifacts.PREDICTIONS, {"min_confidence": min_confidence}, inputs)
    probs_out = RowWriter(tmp / "probabilities.zarr", "probabilities", (query.n_cells, len(names)),
                          query.cell_ids, {"header": header, "class_names": list(names)})
    emb_out = RowWriter(tmp / "embeddings.zarr", "embeddings", (query.n_cells, loaded.config.embed_dim),
                        query.cell_ids, {"header": header})
    given: dict[str, int] = {UNASSIGNED: 0}
    with open(tmp / "predictions.csv", "w", newline="", encoding="utf-8") as handle, \
            console.progress("predict", query.n_cells) as bar:
        writer = csv.writer(handle)
        writer.writerow(["cell_id", "predicted", "probability"] + (["true_label"] if query.labels is not None else []))
        for batch in query.batches:
            probs, emb = run_model(loaded, batch.open, device)
            rows = batch.rows
            probs_out.append(probs)
            emb_out.append(emb)
            best = probs.argmax(1)
            confidence = probs[np.arange(len(best)), best]
            labels = np.where(confidence >= min_confidence, names[best], UNASSIGNED)
            for i, row in enumerate(rows):
                line = [query.cell_ids[row], labels[i], f"{confidence[i]:.6g}"]
                writer.writerow(line + ([query.labels[row]] if query.labels is not None else []))
                given[labels[i]] = given.get(labels[i], 0) + 1
            bar.advance(len(rows))
    probs_out.flush()
    emb_out.flush()
    return given
