"""Notebooks: :func:`annotate` an in-memory AnnData with a trained model, and :func:`fit` a
model on a labelled AnnData.

Both share the command line's code path: the AnnData is written to a slim temporary
``.h5ad`` (the counts, ``var``, the cell ids and, to train, the label column; under
``$TMPDIR``) that the stages read like any other file. The results are added by
:func:`hitanno_cli.anndata_io.add_predictions`, the same fields ``write_annotated_h5ad``
writes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import pandas as pd

from hitanno_cli import artifacts, outputs
from hitanno_cli.anndata_io import add_predictions, field_names
from hitanno_cli.errors import UserError

if TYPE_CHECKING:
    from hitanno_cli.training import TrainOptions

SOURCE = "the AnnData"


def annotate(
    adata: ad.AnnData,
    *,
    model: str | Path,
    min_confidence: float = 0.0,
    batch_size: int = 256,
    device: str = "auto",
    gpu: int | None = None,
    key_added: str = "hitanno",
    copy: bool = True,
    layer: str | None = None,
    majority_voting: bool = False,
    over_clustering_resolution: float | None = None,
) -> ad.AnnData:
    """Annotate ``adata`` (raw counts in ``X``, or in ``layers[layer]``) with the model directory
    ``model`` and return it with the fields of :mod:`hitanno_cli.anndata_io` added.

    ``copy=True`` (the default) leaves ``adata`` as it was and returns an annotated copy;
    ``copy=False`` adds the fields to ``adata`` itself and returns it (a view then becomes
    an AnnData of its own, anndata's rule: its parent is not annotated). ``majority_voting``
    adds each over-cluster's label beside the cell's, as ``predict --majority-voting``.
    """
    from hitanno_cli.prediction import predict

    check_anndata(adata)
    field_names(key_added)  # refused before any work
    if artifacts.kind_of(model) != artifacts.MODEL:
        raise UserError(f"{model} is not a model directory", "pass the folder written by hitanno train")
    with tempfile.TemporaryDirectory(prefix="hitanno-annotate-") as tmp:
        query = scratch_h5ad(adata, Path(tmp) / "query.h5ad", layer=layer)
        with about_the_anndata(query):
            found = predict(
                model,
                h5ad=query,
                output=Path(tmp) / "predictions",
                min_confidence=min_confidence,
                batch_size=batch_size,
                majority_voting=majority_voting,
                over_clustering_resolution=over_clustering_resolution,
                device=device,
                gpu=gpu,
            )
            target = (adata.to_memory() if adata.isbacked else adata.copy()) if copy else adata
            extra = {"model": str(Path(model).resolve())}
            add_predictions(target, predictions_dir=found, key_added=key_added, source=SOURCE, extra=extra)
    target.uns[key_added].pop("query_hash", None)  # the hash of the temporary file: it names nothing
    return target


def fit(
    adata: ad.AnnData,
    *,
    label_key: str,
    output: str | Path,
    options: TrainOptions | None = None,
    device: str = "auto",
    gpu: int | None = None,
    overwrite: bool = False,
    peaks_per_type: int | None = None,
    layer: str | None = None,
) -> Path:
    """Train a model on ``adata`` labelled by ``obs[label_key]`` and write the model directory
    ``output``; returns it.

    The stages of the command line in turn: ``select_peaks`` (``peaks_per_type``, default
    the published size), ``encode`` with the labels, ``train`` with ``options`` (default
    the ``default`` recipe). The counts (``X``, or ``layers[layer]``) must be raw counts.
    The panel and sentences are temporary: an interrupted fit cannot be resumed, only run
    again with ``overwrite=True``.
    """
    from hitanno_cli.selection import select_peaks
    from hitanno_cli.sentences import encode
    from hitanno_cli.training.fit import MODEL_DIRECTORY, train

    check_anndata(adata)
    out = Path(output)
    outputs.check_output(out, kind=MODEL_DIRECTORY, overwrite=overwrite)  # before any work
    if options is not None:
        options.check()
    with tempfile.TemporaryDirectory(prefix="hitanno-fit-") as tmp:
        reference = scratch_h5ad(adata, Path(tmp) / "reference.h5ad", layer=layer, label_key=label_key)
        panel, sentences = Path(tmp) / "panel.json", Path(tmp) / "reference.zarr"
        with about_the_anndata(reference):
            select_peaks(reference, label_key=label_key, peaks_per_type=peaks_per_type).save(panel)
            encode(reference, panel=panel, output=sentences, label_key=label_key)
            return train(
                sentences, panel=panel, output=out, options=options, device=device, gpu=gpu, overwrite=overwrite
            )


def check_anndata(adata: object) -> None:
    """Refuse anything but an AnnData with unique cell ids (predictions are matched by id)."""
    if not isinstance(adata, ad.AnnData):
        hint = "read a file with anndata.read_h5ad first" if isinstance(adata, (str, Path)) else "pass an AnnData"
        raise UserError(f"expected an AnnData, got {type(adata).__name__}", hint)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise UserError(f"{SOURCE} is empty ({adata.n_obs} cells × {adata.n_vars} peaks)", "pass cells and peaks")
    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()][0]
        raise UserError(f"{SOURCE} has duplicate cell ids (e.g. '{dup}')", "call adata.obs_names_make_unique()")


def scratch_h5ad(adata: ad.AnnData, path: Path, *, layer: str | None, label_key: str | None = None) -> Path:
    """Write what the stages read of ``adata`` to ``path``: the counts as ``X``, ``var`` (peak
    coordinates), the cell ids and the label column; nothing else (``uns`` may hold objects
    h5ad cannot store, ``obsm`` and other layers would only cost time)."""
    if layer is not None and layer not in adata.layers:
        raise UserError(f"{SOURCE} has no layer '{layer}'", f"pass one of: {', '.join(adata.layers) or 'none'}")
    matrix = adata.layers[layer] if layer is not None else adata.X
    if matrix is None:
        raise UserError(f"{SOURCE} has no matrix X", "pass the counts in X, or name their layer")
    if adata.isbacked:
        matrix = matrix.to_memory() if hasattr(matrix, "to_memory") else matrix[...]
    obs = pd.DataFrame(index=pd.Index(adata.obs_names.astype(str), name=None))
    if label_key is not None:
        if label_key not in adata.obs.columns:
            columns = ", ".join(map(str, adata.obs.columns[:20])) or "none"
            raise UserError(f"label key '{label_key}' is not a column of obs", f"pass one of: {columns}")
        column = adata.obs[label_key]
        obs[label_key] = pd.Categorical([None if pd.isna(v) else str(v) for v in column], ordered=False)
    var = adata.var.copy()
    var.index = var.index.astype(str)
    ad.AnnData(X=matrix, obs=obs, var=var).write_h5ad(path)
    return path


@contextmanager
def about_the_anndata(scratch: Path) -> Iterator[None]:
    """Let refusals name the AnnData and the temporary folder, not the scratch file's path."""
    try:
        yield
    except UserError as err:
        text = str(err).replace(str(scratch), SOURCE).replace(str(scratch.parent), "(a temporary folder)")
        raise UserError(text) from None
