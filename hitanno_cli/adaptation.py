"""Self-training on a query (pseudo-labels): adapt a model to one query's donor or batch.

Round 1 trains on the reference as usual. Its predictions on the query keep, per
predicted type, the ``fraction`` of query cells it is most confident about; round 2
trains from scratch, with the same options and seed, on the reference plus those cells
under their predicted labels. The model that comes out is specific to that query: it
has seen the query's cells (not their labels), and its directory records which query in
``adaptation.json``. ``docs/recipe.md`` gives the measured effect.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from hitanno_cli import artifacts, console, outputs
from hitanno_cli.batches import sequential_batches
from hitanno_cli.checkpoint import load_model, write_adaptation
from hitanno_cli.errors import UserError
from hitanno_cli.prediction import run_model
from hitanno_cli.runtime import resolve_device, world_size
from hitanno_cli.sentences import SentenceStore, write_store
from hitanno_cli.training import PSEUDO_LABEL_FRACTION, Interrupted, TrainOptions, train


def confident_rows(predicted: np.ndarray, confidence: np.ndarray, fraction: float) -> np.ndarray:
    """Rows to pseudo-label: per predicted class, the ``fraction`` most confident (at least one), ascending."""
    keep = []
    for c in np.unique(predicted):
        rows = np.flatnonzero(predicted == c)
        k = max(1, math.ceil(round(fraction * rows.size, 6)))  # round: 0.3 · 10 is 3.0000000000000004
        keep.append(rows[np.argsort(-confidence[rows], kind="stable")[:k]])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def predict_store(
    model_dir: Path, store: SentenceStore, device: torch.device, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Predicted class index and its probability for every cell of ``store``, streamed."""
    loaded = load_model(model_dir, device)
    store.check_panel(loaded.panel.content_hash)
    predicted = np.zeros(store.n_cells, dtype=np.int64)
    confidence = np.zeros(store.n_cells, dtype=np.float32)
    for batch in sequential_batches(store, None, batch_size):
        probabilities, _ = run_model(loaded, batch.open, device)
        predicted[batch.rows] = probabilities.argmax(1)
        confidence[batch.rows] = probabilities.max(1)
    return predicted, confidence, loaded.class_names


def _packed_rows(reference: SentenceStore, query: SentenceStore, rows: np.ndarray) -> Iterator[np.ndarray]:
    """Every reference row, then the chosen query rows, as packed blocks (chunk by chunk)."""
    for lo, hi in reference.iter_chunks():
        yield reference.read_packed(lo, hi)
    for lo, hi in query.iter_chunks():
        chosen = rows[(rows >= lo) & (rows < hi)]
        if chosen.size:
            yield query.read_packed(lo, hi)[chosen - lo]


def self_train(
    sentences: str | Path,
    *,
    query: str | Path,
    panel: str | Path | None = None,
    output: str | Path,
    options: TrainOptions,
    fraction: float = PSEUDO_LABEL_FRACTION,
    device: str = "auto",
    gpu: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Train on ``sentences``, pseudo-label ``query``, train again on both; write ``output``."""
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"--pseudo-label-fraction must be in (0, 1], got {fraction}", "e.g. 0.3")
    if world_size() > 1:
        raise UserError("self-training (--adapt-to) runs in one process", "run it without torchrun")
    inputs = [sentences, query] + ([panel] if panel is not None else [])
    with outputs.writing(output, kind=artifacts.MODEL, overwrite=overwrite, inputs=inputs) as out:
        _self_train(
            Path(sentences), Path(query), out, panel=panel, options=options, fraction=fraction, device=device, gpu=gpu
        )
    console.info(f"train: self-trained on {query} → {out}")
    return out


def _self_train(
    sentences: Path,
    query: Path,
    out: Path,
    *,
    panel: str | Path | None,
    options: TrainOptions,
    fraction: float,
    device: str,
    gpu: int | None,
) -> None:
    reference, target = SentenceStore(sentences), SentenceStore(query)
    target.check_panel(reference.panel_hash)
    ref_labels = reference.labels()
    if ref_labels is None:
        raise UserError(f"{reference.path} was encoded without labels", "re-encode the reference with --label-key")
    chosen_device = resolve_device(device, gpu)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.adapt-", dir=out.parent))  # beside out: renamed into place
    try:
        console.info("train: round 1 of 2, on the reference")
        train(reference.path, panel=panel, output=work / "round1", options=options, device=device, gpu=gpu)
        predicted, confidence, names = predict_store(work / "round1", target, chosen_device)
        rows = confident_rows(predicted, confidence, fraction)
        labels = np.array(names, dtype=object)[predicted[rows]]
        console.info(
            f"train: {rows.size} of {target.n_cells} query cells pseudo-labelled "
            f"(the {fraction:.0%} most confident per predicted type)"
        )
        ids = np.concatenate([reference.cell_ids(), target.cell_ids()[rows]]).astype(str)
        all_labels = np.concatenate([ref_labels, labels]).astype(str)
        params = {"pseudo_label_fraction": fraction}
        inputs = {"reference": reference.content_hash, "query": target.content_hash}
        combined = write_store(
            work / "combined.zarr",
            blocks=_packed_rows(reference, target, rows),
            ids=ids,
            labels=all_labels,
            like=reference,
            params=params,
            inputs=inputs,
        )
        console.info("train: round 2 of 2, on the reference and the pseudo-labelled query cells")
        train(combined, panel=panel, output=work / "round2", options=options, device=device, gpu=gpu)
        write_adaptation(
            work / "round2",
            params=params,
            inputs=inputs,
            query=str(target.path.resolve()),
            pseudo_labelled=int(rows.size),
            of=target.n_cells,
            per_type={name: int((labels == name).sum()) for name in names},
        )
        artifacts.replace_path(work / "round2", out)
    except Interrupted:
        raise UserError("self-training was interrupted; it cannot be resumed", "run it again") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
