"""The predictions format (``hitanno.predictions``): what ``predict`` writes, and reading it.

One directory, written atomically:

* ``predictions.csv`` — ``cell_id, predicted, probability`` (and ``true_label`` when the
  query has labels); ``Unassigned`` where the probability is below ``--min-confidence``;
* ``probabilities.zarr`` — the ``[cells, n_types]`` probability matrix (float32), with the
  class names in its attributes;
* ``embeddings.zarr`` — the ``[cells, n_types]`` cell embeddings, each cell's
  log-probabilities (float32; format 1.1 held the level-2 CLS output, ``embed_dim`` wide);
* ``majority_voting.csv`` (with ``predict --majority-voting``) — ``cell_id,
  over_clustering, majority_voting, majority_confidence``: each cell's over-cluster, that
  cluster's most common predicted label and the share of its cells that agree.

Both zarr groups hold ``cell_ids`` and the format header in their attributes. Those of
``probabilities.zarr`` also hold the hashes of the table, both arrays and the ids, and a
hash of themselves; readers check each file they read against them.
"""

from __future__ import annotations

import csv
import hashlib
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
MAJORITY = "majority_voting.csv"
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
        self.group = zarr.open_group(path, mode="w", zarr_format=3)
        self.group.attrs["hitanno"] = attrs
        artifacts.write_strings(self.group, "cell_ids", np.asarray(cell_ids, dtype=str))
        self.chunk_rows = max(1, min(shape[0], chunk_rows))
        self.array = self.group.create_array(
            name,
            shape=shape,
            chunks=(self.chunk_rows, shape[1]),
            dtype="float32",
            config={"write_empty_chunks": True},  # skip zarr's all-fill check of every chunk
        )
        self.pending: list[np.ndarray] = []
        self.written = 0
        self.digest = hashlib.sha256()  # of the rows' bytes, in order: the array's hash

    def append(self, block: np.ndarray) -> None:
        """Queue rows; write every chunk that is complete."""
        rows = np.ascontiguousarray(block, dtype=np.float32)
        self.digest.update(rows)
        self.pending.append(rows)
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
        self.embeddings = RowWriter(  # the log-probabilities: as wide as the probabilities
            directory / EMBEDDINGS,
            "embeddings",
            shape=(n, len(class_names)),
            cell_ids=cell_ids,
            attrs={"header": header},
        )
        self.directory, self.header, self.class_names = directory, header, list(class_names)
        self.ids_hash = artifacts.sha256_lines(np.asarray(cell_ids, dtype=str))
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
        """Write what is still queued, close the table, and record the hashes of everything."""
        self._handle.close()
        self.probabilities.flush()
        self.embeddings.flush()
        hashes = {
            CSV: artifacts.sha256_file(self.directory / CSV),
            "probabilities": "sha256:" + self.probabilities.digest.hexdigest(),
            "embeddings": "sha256:" + self.embeddings.digest.hexdigest(),
            "cell_ids": self.ids_hash,
        }
        record = {"header": self.header, "class_names": self.class_names, "hashes": hashes}
        self.probabilities.group.attrs["hitanno"] = artifacts.sealed(record, "meta_hash")

    def __enter__(self) -> PredictionsWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:  # the folder is discarded: just let go of the table
            self._handle.close()


def add_majority_voting(
    directory: Path,
    *,
    cell_ids: np.ndarray,
    clusters: np.ndarray,
    labels: np.ndarray,
    confidence: np.ndarray,
    summary: dict[str, Any],
) -> None:
    """Add majority voting's table to a predictions folder being written (its per-cell
    labels stay as they are) and record the table's hash and ``summary`` with the others."""
    record = read_record(directory)
    if record is None:
        raise UserError(f"{directory} is not a predictions folder", "run hitanno predict first")
    path = directory / MAJORITY
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["cell_id", "over_clustering", "majority_voting", "majority_confidence"])
        for row in zip(cell_ids, clusters, labels, confidence, strict=True):
            writer.writerow([row[0], int(row[1]), row[2], f"{row[3]:.6g}"])
    record = {key: value for key, value in record.items() if key != "meta_hash"}
    record["hashes"] = {**record["hashes"], MAJORITY: artifacts.sha256_file(path)}
    record["majority_voting"] = summary
    zarr.open_group(directory / PROBABILITIES, mode="r+").attrs["hitanno"] = artifacts.sealed(record, "meta_hash")


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
    """Read ``predictions.csv`` and the class names stored beside it.

    Written by ``predict``, the table is checked against the hash recorded beside it; a
    table made by hand (no ``probabilities.zarr`` beside it) is read as it is.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"predictions file {path} does not exist", f"pass the {CSV} written by hitanno predict")
    record = read_record(path.parent)
    if record is not None and record["hashes"].get(CSV) != artifacts.sha256_file(path):
        raise UserError(f"{path} is corrupted or was edited: it does not match its hash", "run hitanno predict again")
    rows = _read_rows(path)
    ids = np.array([r["cell_id"] for r in rows], dtype=object)
    predicted = np.array([r["predicted"] for r in rows], dtype=object)
    try:
        probability = np.array([float(r.get("probability") or "nan") for r in rows])
    except ValueError as err:
        raise UserError(
            f"{path} has a probability that is not a number ({err})", f"pass the {CSV} of hitanno predict"
        ) from None
    classes = (record["class_names"] if record else None) or sorted(set(predicted) - {UNASSIGNED})
    return Predictions(ids, predicted, probability, list(classes), path.parent)


def _read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a predictions table, refusing one that is not a complete CSV of them."""
    fix = f"pass the {CSV} written by hitanno predict"
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{path} is not a predictions table ({type(err).__name__})", fix) from None
    if not rows or not {"cell_id", "predicted"} <= set(rows[0]):
        raise UserError(f"{path} is not a hitanno {CSV} (needs cell_id and predicted columns, and a row)", fix)
    for number, row in enumerate(rows, start=2):
        if None in row or None in row.values():  # too many or too few fields
            raise UserError(f"{path} line {number} does not have one value per column (truncated?)", fix)
    return rows


def read_record(directory: Path) -> dict[str, Any] | None:
    """The verified attributes of ``probabilities.zarr`` (header, class names, hashes); None
    if the folder has none (a table made by hand)."""
    store = directory / PROBABILITIES
    if not store.exists():
        return None
    fix = "run hitanno predict again"
    try:
        record = dict(zarr.open_group(store, mode="r").attrs)["hitanno"]
        header = artifacts.check_header(record.get("header"), artifacts.PREDICTIONS, store)
    except UserError:
        raise
    except Exception:
        raise UserError(f"{store} is damaged (its attributes cannot be read)", fix) from None
    hashed = artifacts.is_hashed(header) or "meta_hash" in record
    if hashed and not artifacts.seal_holds(record, "meta_hash"):
        raise UserError(f"{store} is corrupted or was edited: its attributes do not match their hash", fix)
    if not hashed:  # written before predictions carried hashes
        record = {**record, "hashes": {}}
    return record


def read_embeddings(directory: Path, cell_ids: np.ndarray) -> np.ndarray | None:
    """The cell embeddings beside the predictions, row-aligned with ``cell_ids`` and checked
    against their hash; None if absent or for other cells."""
    if not (directory / EMBEDDINGS / "zarr.json").is_file():
        return None
    ids, embeddings = read_array(directory, "embeddings")
    if len(ids) != len(cell_ids) or not np.array_equal(ids, cell_ids):
        return None
    return embeddings


def read_array(directory: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(cell_ids, matrix)`` of ``probabilities`` or ``embeddings`` beside the predictions,
    checked against the hashes the predictions record."""
    store = directory / (PROBABILITIES if name == "probabilities" else EMBEDDINGS)
    fix = "run hitanno predict again"
    hashes = (read_record(directory) or {"hashes": {}})["hashes"]
    try:
        group = zarr.open_group(store, mode="r")
        ids = group["cell_ids"][:].astype(object)
        matrix = np.ascontiguousarray(group[name][:], dtype=np.float32)
    except Exception:
        raise UserError(f"{store} is damaged (cannot be read)", fix) from None
    expected = hashes.get(name)
    if expected is not None and (
        expected != artifacts.sha256_array(matrix) or hashes.get("cell_ids") != artifacts.sha256_lines(ids)
    ):
        raise UserError(f"{store} is corrupted or was edited: it does not match its hash", fix)
    return ids, matrix


@dataclass
class MajorityVoting:
    """What ``predict --majority-voting`` added: per cell, its over-cluster and that cluster's label."""

    cell_ids: np.ndarray
    clusters: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray
    summary: dict[str, Any]
    content_hash: str  # the table's sha256, as the predictions record it


def read_majority_voting(directory: Path) -> MajorityVoting | None:
    """The majority-voting table of a predictions folder, checked against its hash; None
    when ``predict`` ran without ``--majority-voting``."""
    record = read_record(directory)
    path = directory / MAJORITY
    if record is None or MAJORITY not in record["hashes"]:
        if path.exists():
            raise UserError(f"{path} is not recorded by its predictions (added by hand?)", "run hitanno predict again")
        return None
    if not path.is_file() or record["hashes"][MAJORITY] != artifacts.sha256_file(path):
        raise UserError(f"{path} is missing, corrupted or was edited", "run hitanno predict --majority-voting again")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return MajorityVoting(
        cell_ids=np.array([r["cell_id"] for r in rows], dtype=object),
        clusters=np.array([int(r["over_clustering"]) for r in rows], dtype=np.int64),
        labels=np.array([r["majority_voting"] for r in rows], dtype=object),
        confidence=np.array([float(r["majority_confidence"]) for r in rows]),
        summary=dict(record["majority_voting"]),
        content_hash=record["hashes"][MAJORITY],
    )
