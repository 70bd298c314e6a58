"""Predictions into AnnData: the fields :func:`add_predictions` adds, and
:func:`write_annotated_h5ad`, a copy of the query ``.h5ad`` that carries them.

With the default key ``hitanno`` a cell gets ``obs["hitanno_label"]`` (categorical, the
class names and ``Unassigned``), ``obs["hitanno_confidence"]`` (its best probability) and
``obs["hitanno_unassigned"]``; ``obsm["X_hitanno"]`` holds the cell embeddings (each
cell's log-probabilities over the types: a representation for
``sc.pp.neighbors(use_rep=...)``), ``obsm["hitanno_probabilities"]``
the probability matrix, and ``uns["hitanno"]`` the record of what made them (model hash,
versions, ``min_confidence``, class names). After ``predict --majority-voting`` a cell also
gets ``obs["hitanno_majority_voting"]`` (its over-cluster's label),
``obs["hitanno_majority_confidence"]`` and ``obs["hitanno_over_clustering"]``. The
predictions are matched to the cells by id, whatever their order; predictions for other
cells are refused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from hitanno_cli import __version__, artifacts, outputs, predictions
from hitanno_cli.errors import UserError

#: The obs/obsm names of each field, filled with the key.
FIELDS = {
    "label": "{key}_label",
    "confidence": "{key}_confidence",
    "unassigned": "{key}_unassigned",
    "embedding": "X_{key}",
    "probabilities": "{key}_probabilities",
    "majority_voting": "{key}_majority_voting",
    "majority_confidence": "{key}_majority_confidence",
    "over_clustering": "{key}_over_clustering",
}
FIX_PREDICTIONS = "pass the folder written by hitanno predict (run it again if it was changed)"


def field_names(key_added: str) -> dict[str, str]:
    """The obs/obsm name of each field under ``key_added`` (refusing a key h5ad cannot store)."""
    if not isinstance(key_added, str) or not key_added.strip() or "/" in key_added:
        raise UserError(f"key_added {key_added!r} cannot name AnnData fields", "pass a plain name, e.g. 'hitanno'")
    return {field: pattern.format(key=key_added) for field, pattern in FIELDS.items()}


# -- reading a predictions directory, every file checked against its hash ------------------
class PredictionResults:
    """What ``predict`` wrote, row-aligned: ids, labels, probabilities, embeddings, record."""

    def __init__(self, directory: str | Path) -> None:
        path = Path(directory)
        self.directory = path.parent if path.name == predictions.CSV else path
        record = predictions.read_record(self.directory)
        if record is None or not (self.directory / predictions.EMBEDDINGS).exists():
            raise UserError(f"{self.directory} is not a predictions folder written by hitanno predict", FIX_PREDICTIONS)
        table = predictions.read_predictions(self.directory / predictions.CSV)
        self.record: dict[str, Any] = record
        self.class_names = [str(name) for name in record["class_names"]]
        self.cell_ids, self.probabilities = self._probabilities()
        if not np.array_equal(table.cell_ids, self.cell_ids):
            raise UserError(f"{self.directory}: the table and the probabilities are for other cells", FIX_PREDICTIONS)
        self.labels = table.predicted
        embeddings = predictions.read_embeddings(self.directory, self.cell_ids)
        if embeddings is None:
            raise UserError(f"{self.directory}: the embeddings are for other cells", FIX_PREDICTIONS)
        self.embeddings = embeddings
        self.majority = predictions.read_majority_voting(self.directory)
        if self.majority is not None and not np.array_equal(self.majority.cell_ids, self.cell_ids):
            raise UserError(f"{self.directory}: the majority voting is for other cells", FIX_PREDICTIONS)

    def _probabilities(self) -> tuple[np.ndarray, np.ndarray]:
        """Cell ids and the probability matrix of ``probabilities.zarr``, checked against their hashes."""
        store = self.directory / predictions.PROBABILITIES
        ids, matrix = predictions.read_array(self.directory, "probabilities")
        if matrix.shape != (len(ids), len(self.class_names)):
            raise UserError(f"{store} does not hold one probability per cell and class", FIX_PREDICTIONS)
        return ids, matrix

    def order_for(self, cell_ids: pd.Index, source: str) -> np.ndarray:
        """The row of each of ``cell_ids`` in the predictions; refuse unless they are the same cells."""
        ids = pd.Index(self.cell_ids)
        if not cell_ids.is_unique:
            dup = cell_ids[cell_ids.duplicated()][0]
            raise UserError(
                f"{source} has duplicate cell ids (e.g. '{dup}')", "make them unique: obs_names_make_unique()"
            )
        rows = ids.get_indexer(cell_ids)
        missing = int((rows < 0).sum())
        extra = len(ids) - (len(cell_ids) - missing)
        if missing or extra:
            example = cell_ids[rows < 0][0] if missing else ids.difference(cell_ids)[0]
            raise UserError(
                f"the predictions in {self.directory} are not for the cells of {source}: {missing} of its "
                f"{len(cell_ids)} cells have none, {extra} predicted cells are not in it (e.g. '{example}')",
                "pass the predictions hitanno predict wrote for this query",
            )
        return rows

    def uns_record(self) -> dict[str, Any]:
        """What ``uns[key]`` records: the model's and query's hashes, versions, threshold, classes."""
        header = self.record["header"]
        inputs, params = header.get("inputs", {}), header.get("params", {})
        found = {
            "model_hash": inputs.get("model"),
            "query_hash": inputs.get("query"),
            "predicted_with": header.get("hitanno_version"),
            "predicted_at": header.get("created"),
            "min_confidence": params.get("min_confidence"),
        }
        record = {key: value for key, value in found.items() if value is not None}  # h5ad stores no None
        return {**record, "hitanno_version": __version__, "class_names": list(self.class_names)}


# -- the fields -------------------------------------------------------------------------------
@dataclass
class Fields:
    """The obs columns, obsm matrices and uns record that annotate one set of cells."""

    obs: dict[str, Any]
    obsm: dict[str, np.ndarray]
    uns: dict[str, Any]


def annotation_fields(
    results: PredictionResults, cell_ids: pd.Index, *, key_added: str, source: str, extra: dict[str, Any] | None
) -> Fields:
    """The fields for the cells ``cell_ids`` (in their order) from what ``predict`` wrote."""
    names = field_names(key_added)
    rows = results.order_for(cell_ids, source)
    probabilities = results.probabilities[rows]
    labels = results.labels[rows]
    categories = [
        *results.class_names,
        *([] if predictions.UNASSIGNED in results.class_names else [predictions.UNASSIGNED]),
    ]
    unknown = set(labels) - set(categories)
    if unknown:
        raise UserError(
            f"{results.directory} labels cells '{sorted(unknown)[0]}', not one of its classes", FIX_PREDICTIONS
        )
    obs = {
        names["label"]: pd.Categorical(labels, categories=categories),
        names["confidence"]: probabilities.max(axis=1).astype(np.float64),
        names["unassigned"]: labels == predictions.UNASSIGNED,
    }
    uns = {**results.uns_record(), **(extra or {})}
    if results.majority is not None:
        vote = results.majority
        obs[names["majority_voting"]] = pd.Categorical(vote.labels[rows], categories=categories)
        obs[names["majority_confidence"]] = vote.confidence[rows]
        obs[names["over_clustering"]] = pd.Categorical(vote.clusters[rows].astype(str))
        uns["majority_voting"] = dict(vote.summary)
    else:
        names = {field: name for field, name in names.items() if field not in MAJORITY_FIELDS}
    obsm = {
        names["embedding"]: np.ascontiguousarray(results.embeddings[rows], dtype=np.float32),
        names["probabilities"]: np.ascontiguousarray(probabilities, dtype=np.float32),
    }
    return Fields(obs=obs, obsm=obsm, uns={**uns, "fields": names})


#: The fields only ``predict --majority-voting`` fills.
MAJORITY_FIELDS = ("majority_voting", "majority_confidence", "over_clustering")


def add_predictions(
    adata: ad.AnnData,
    *,
    predictions_dir: str | Path,
    key_added: str = "hitanno",
    source: str = "the AnnData",
    extra: dict[str, Any] | None = None,
) -> ad.AnnData:
    """Add the results of ``predictions_dir`` to ``adata`` in place (see the module docstring)
    and return it; ``extra`` goes into ``uns[key_added]`` too (e.g. the model's path)."""
    field_names(key_added)
    results = PredictionResults(predictions_dir)
    fields = annotation_fields(
        results, pd.Index(adata.obs_names.astype(str)), key_added=key_added, source=source, extra=extra
    )
    for name, values in fields.obs.items():
        adata.obs[name] = values
    for name, matrix in fields.obsm.items():
        adata.obsm[name] = matrix
    adata.uns[key_added] = fields.uns
    return adata


# -- an annotated copy of an .h5ad ----------------------------------------------------------------
def is_annotated_h5ad(path: Path, key_added: str = "hitanno") -> bool:
    """Whether ``path`` is an ``.h5ad`` written by :func:`write_annotated_h5ad` with ``key_added``
    (what ``overwrite`` may replace)."""
    if path.suffix != ".h5ad" or not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as handle:
            record = handle.get(f"uns/{key_added}")
            return isinstance(record, h5py.Group) and {"class_names", "hitanno_version"} <= set(record)
    except (OSError, ValueError):  # not an HDF5 file
        return False


def write_annotated_h5ad(
    query_h5ad: str | Path,
    *,
    predictions_dir: str | Path,
    output: str | Path,
    overwrite: bool = False,
    key_added: str = "hitanno",
) -> Path:
    """Write a copy of ``query_h5ad`` to ``output`` with the results of ``predictions_dir`` added.

    The query is never changed. It is copied byte for byte under a temporary name beside
    ``output`` (so the copy keeps its matrices, layers and compression), only ``obs``,
    ``obsm`` and ``uns`` of the copy are rewritten, and the copy is renamed into place:
    memory is the size of ``obs`` and the added matrices, not of the counts. ``overwrite``
    replaces only an ``.h5ad`` this function wrote.
    """
    query, out = Path(query_h5ad), Path(output)
    field_names(key_added)
    if out.suffix != ".h5ad":
        raise UserError(f"output {out} does not end in .h5ad", "name the annotated copy NAME.h5ad")
    if not query.is_file():
        raise UserError(f"{query} does not exist", "pass the query .h5ad the predictions were made from")
    kind = (lambda path: is_annotated_h5ad(path, key_added), f"hitanno-annotated .h5ad (with uns['{key_added}'])")
    with outputs.writing(out, kind=kind, overwrite=overwrite, inputs=[query, predictions_dir]) as final:
        results = PredictionResults(predictions_dir)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp.h5ad", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            shutil.copyfile(query, tmp)
            annotate_file(tmp, results, key_added=key_added, source=str(query))
            artifacts.ordinary_mode(tmp, directory=False)
            artifacts.replace_path(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return out


def annotate_file(path: Path, results: PredictionResults, *, key_added: str, source: str) -> None:
    """Add the fields to the ``.h5ad`` at ``path`` in place, rewriting only obs, obsm and uns."""
    from anndata.io import read_elem, write_elem

    try:
        with h5py.File(path, "r+") as handle:
            obs = handle.get("obs")
            if not isinstance(obs, h5py.Group):  # a pre-0.7 file: obs is one table, not one column per dataset
                raise UserError(f"{source} is an .h5ad from before anndata 0.7", "re-save it with anndata.write_h5ad")
            frame = read_elem(obs)
            fields = annotation_fields(
                results, pd.Index(frame.index.astype(str)), key_added=key_added, source=source, extra=None
            )
            for name, values in fields.obs.items():
                frame[name] = values
            del handle["obs"]
            write_elem(handle, "obs", frame)
            for group, entries in (("obsm", fields.obsm), ("uns", {key_added: fields.uns})):
                if group not in handle:
                    write_elem(handle, group, {})
                for name, value in entries.items():
                    if name in handle[group]:
                        del handle[group][name]
                    write_elem(handle[group], name, value)
    except UserError:
        raise
    except Exception as err:
        problem = f"{source} cannot be annotated as an .h5ad ({type(err).__name__}: {err})"
        raise UserError(problem, "check the file") from None
