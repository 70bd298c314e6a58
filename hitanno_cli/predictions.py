"""The predictions format (``hitanno.predictions``): what ``predict`` writes, and reading it.

One directory, written atomically:

* ``predictions.csv`` — ``cell_id, predicted, probability`` (and ``true_label`` when the
  query has labels); ``Unassigned`` where the probability is below ``--min-confidence``;
* ``probabilities.zarr`` — the ``[cells, n_types]`` probability matrix (float32), with the
  class names in its attributes;
* ``embeddings.zarr`` — the ``[cells, embed_dim]`` cell embeddings (float32).

Both zarr groups hold ``cell_ids`` and the format header in their attributes.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import zarr

from hitanno_cli import artifacts
from hitanno_cli.errors import UserError

CSV = "predictions.csv"
PROBABILITIES = "probabilities.zarr"
EMBEDDINGS = "embeddings.zarr"
#: The label given to cells below ``--min-confidence``.
UNASSIGNED = artifacts.UNASSIGNED
#: Rows per chunk of the probability and embedding arrays.
OUTPUT_CHUNK_ROWS = 16384


# -- writing -----------------------------------------------------------------------------
class RowWriter:
    """Appends rows to a float32 zarr array, writing whole chunks only (no rewrites)."""

    def __init__(
        self,
        path: Path,
        name: str,
        *,
        shape: tuple[int, int],
        cell_ids: np.ndarray,
        attrs: dict[str, Any],
        chunk_rows: int = OUTPUT_CHUNK_ROWS,
    ) -> None:
        group = zarr.open_group(path, mode="w", zarr_format=3)
        group.attrs["hitanno"] = attrs
        artifacts.write_strings(group, "cell_ids", np.asarray(cell_ids, dtype=str))
        self.chunk_rows = max(1, min(shape[0], chunk_rows))
        self.array = group.create_array(
            name,
            shape=shape,
            chunks=(self.chunk_rows, shape[1]),
            dtype="float32",
            config={"write_empty_chunks": True},  # skip zarr's all-fill check of every chunk
        )
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
            self.array[self.written : self.written + n] = rows[:n]
            self.written += n
        self.pending = [rows[n:]] if n < len(rows) else []


class PredictionsWriter:
    """Writes the three outputs of ``predict`` into a directory, one batch of cells at a time."""

    def __init__(
        self,
        directory: Path,
        *,
        header: dict[str, Any],
        class_names: list[str],
        cell_ids: np.ndarray,
        embed_dim: int,
        with_truth: bool,
    ) -> None:
        n = len(cell_ids)
        self.names = np.array(class_names, dtype=object)
        self.probabilities = RowWriter(
            directory / PROBABILITIES,
            "probabilities",
            shape=(n, len(class_names)),
            cell_ids=cell_ids,
            attrs={"header": header, "class_names": list(class_names)},
        )
        self.embeddings = RowWriter(
            directory / EMBEDDINGS, "embeddings", shape=(n, embed_dim), cell_ids=cell_ids, attrs={"header": header}
        )
        self._handle: IO[str] = open(directory / CSV, "w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._handle)
        self._csv.writerow(["cell_id", "predicted", "probability"] + (["true_label"] if with_truth else []))
        self.given: dict[str, int] = {UNASSIGNED: 0}

    def add(
        self,
        cell_ids: np.ndarray,
        *,
        probabilities: np.ndarray,
        embeddings: np.ndarray,
        min_confidence: float,
        truth: np.ndarray | None = None,
    ) -> None:
        """Write one batch: each cell's best class, or ``Unassigned`` below ``min_confidence``."""
        self.probabilities.append(probabilities)
        self.embeddings.append(embeddings)
        best = probabilities.argmax(1)
        confidence = probabilities[np.arange(len(best)), best]
        labels = np.where(confidence >= min_confidence, self.names[best], UNASSIGNED)
        for i, cell in enumerate(cell_ids):
            line = [cell, labels[i], f"{confidence[i]:.6g}"]
            self._csv.writerow(line + ([truth[i]] if truth is not None else []))
            self.given[labels[i]] = self.given.get(labels[i], 0) + 1

    def close(self) -> None:
        """Write what is still queued and close the table."""
        self._handle.close()
        self.probabilities.flush()
        self.embeddings.flush()

    def __enter__(self) -> PredictionsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- reading -----------------------------------------------------------------------------
@dataclass
class Predictions:
    """What ``predict`` wrote: per-cell labels, the model's classes, and the folder."""

    cell_ids: np.ndarray
    predicted: np.ndarray
    probability: np.ndarray
    class_names: list[str]
    directory: Path


def read_predictions(path: str | Path) -> Predictions:
    """Read ``predictions.csv`` and the class names stored beside it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"predictions file {path} does not exist", f"pass the {CSV} written by hitanno predict")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"cell_id", "predicted"} <= set(rows[0]):
        raise UserError(
            f"{path} is not a hitanno {CSV} (needs cell_id and predicted columns)",
            f"pass the {CSV} written by hitanno predict",
        )
    ids = np.array([r["cell_id"] for r in rows], dtype=object)
    predicted = np.array([r["predicted"] for r in rows], dtype=object)
    probability = np.array([float(r.get("probability") or "nan") for r in rows])
    classes = _class_names(path.parent) or sorted(set(predicted) - {UNASSIGNED})
    return Predictions(ids, predicted, probability, classes, path.parent)


def _class_names(directory: Path) -> list[str] | None:
    store = directory / PROBABILITIES
    if not (store / "zarr.json").is_file():
        return None
    meta = dict(zarr.open_group(store, mode="r").attrs).get("hitanno", {})
    return list(meta.get("class_names") or []) or None


def read_embeddings(directory: Path, cell_ids: np.ndarray) -> np.ndarray | None:
    """The cell embeddings beside the predictions, row-aligned with ``cell_ids``; None if absent."""
    store = directory / EMBEDDINGS
    if not (store / "zarr.json").is_file():
        return None
    group = zarr.open_group(store, mode="r")
    ids = group["cell_ids"][:].astype(object)
    if len(ids) != len(cell_ids) or not np.array_equal(ids, cell_ids):
        return None
    return np.asarray(group["embeddings"][:], dtype=np.float32)
