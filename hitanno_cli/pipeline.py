"""``hitanno run``: the whole pipeline, cached like make.

Stages run in order — select-peaks, encode the reference, encode the query, train,
predict, annotate (a copy of the query ``.h5ad`` with the results added), evaluate (when
the query has labels) — each writing one artifact into the output folder. A stage's
*fingerprint* hashes its parameters, the content of the input files it reads and the
fingerprints of the stages it depends on. ``run.json`` records
each stage's fingerprint and what happened to it; a stage whose artifact exists and
whose fingerprint is unchanged is skipped, so changing a parameter reruns exactly the
stages downstream of it. ``--from STAGE`` forces that stage and everything after it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hitanno_cli import artifacts, console, outputs
from hitanno_cli.errors import UserError
from hitanno_cli.training.options import PSEUDO_LABEL_FRACTION

STAGES = ("select-peaks", "encode-reference", "encode-query", "train", "predict", "annotate", "evaluate")
MANIFEST = "run.json"


@dataclass
class Stage:
    """One step: what it writes, what determines it, and how to make it."""

    name: str
    output: Path
    params: dict[str, Any]
    upstream: list[str]
    make: Callable[[], Any]
    files: list[Path] = field(default_factory=list)


@dataclass
class RunSettings:
    """Options of ``hitanno run`` beyond the inputs (defaults = each stage's own)."""

    peaks_per_type: int | None = None
    min_cells: int = 10
    exclude_types: list[str] = field(default_factory=list)
    min_coverage: float = 0.5
    min_confidence: float = 0.0
    device: str = "auto"
    gpu: int | None = None
    train: Any = None  # training.TrainOptions
    #: Self-train on the query (train --adapt-to) with this pseudo-labelled share; None: do not.
    pseudo_label_fraction: float | None = PSEUDO_LABEL_FRACTION
    majority_voting: bool = False
    over_clustering_resolution: float | None = None
    annotated_h5ad: bool = True  # write the annotated copy of the query


#: What each stage writes, inside the run's folder.
OUTPUTS = {
    "select-peaks": "panel.json",
    "encode-reference": "reference.zarr",
    "encode-query": "query.zarr",
    "train": "model",
    "predict": "predictions",
    "annotate": "annotated.h5ad",
    "evaluate": "report",
}


def plan(ref: Path, query: Path, label_key: str, out: Path, settings: RunSettings) -> list[Stage]:
    """The stages of a run, in order (evaluate only when the query carries labels)."""
    from hitanno_cli import predictions as predictions_format
    from hitanno_cli.anndata_io import write_annotated_h5ad
    from hitanno_cli.evaluation import evaluate
    from hitanno_cli.h5ad import H5ad
    from hitanno_cli.prediction import predict
    from hitanno_cli.selection import select_peaks
    from hitanno_cli.training import TrainOptions

    with H5ad(query) as h5:
        query_labelled = label_key in h5.obs_columns()
    query_key = label_key if query_labelled else None
    path = {stage: out / name for stage, name in OUTPUTS.items()}
    panel, ref_zarr, query_zarr = path["select-peaks"], path["encode-reference"], path["encode-query"]
    model, predictions, report = path["train"], path["predict"], path["evaluate"]
    voting = {"majority_voting": settings.majority_voting, "over_clustering_resolution": None}
    if settings.majority_voting:
        voting["over_clustering_resolution"] = settings.over_clustering_resolution
    options = settings.train or TrainOptions()
    device = {"device": settings.device, "gpu": settings.gpu}
    select = {
        "label_key": label_key,
        "peaks_per_type": settings.peaks_per_type,
        "min_cells": settings.min_cells,
        "exclude_types": sorted(settings.exclude_types),
    }
    coverage = settings.min_coverage

    def make_panel() -> None:
        with outputs.writing(panel, kind=artifacts.PANEL, overwrite=True, inputs=[ref]):
            chosen = select_peaks(
                ref,
                label_key=label_key,
                peaks_per_type=settings.peaks_per_type,
                min_cells=settings.min_cells,
                exclude_types=settings.exclude_types,
            )
            chosen.save(panel, overwrite=True)

    stages = [
        Stage("select-peaks", panel, select, [], files=[ref], make=make_panel),
        encode_stage("encode-reference", ref, output=ref_zarr, panel=panel, label_key=label_key, coverage=coverage),
        encode_stage("encode-query", query, output=query_zarr, panel=panel, label_key=query_key, coverage=coverage),
        train_stage(
            ref_zarr=ref_zarr,
            query_zarr=query_zarr,
            panel=panel,
            model=model,
            options=options,
            fraction=settings.pseudo_label_fraction,
            device=device,
        ),
        Stage(
            "predict",
            predictions,
            {"min_confidence": settings.min_confidence, **voting},
            ["train", "encode-query"],
            make=lambda: predict(
                model,
                output=predictions,
                sentences=query_zarr,
                min_confidence=settings.min_confidence,
                overwrite=True,
                **voting,
                **device,
            ),
        ),
    ]
    if settings.annotated_h5ad:
        annotated = path["annotate"]
        stages.append(
            Stage(
                "annotate",
                annotated,
                {},
                ["predict"],
                files=[query],
                make=lambda: write_annotated_h5ad(query, predictions_dir=predictions, output=annotated, overwrite=True),
            )
        )
    if query_labelled:
        stages.append(
            Stage(
                "evaluate",
                report,
                {},
                ["predict", "encode-query"],
                make=lambda: evaluate(
                    predictions / predictions_format.CSV, truth=query_zarr, output=report, overwrite=True
                ),
            )
        )
    else:
        console.info(f"run: the query has no '{label_key}' column; evaluate is skipped")
    return stages


def encode_stage(name: str, data: Path, *, output: Path, panel: Path, label_key: str | None, coverage: float) -> Stage:
    """An encode stage: ``data`` through the run's panel into ``output``."""
    from hitanno_cli.sentences import encode

    params = {"label_key": label_key, "min_coverage": coverage}
    return Stage(
        name,
        output,
        params,
        ["select-peaks"],
        files=[data],
        make=lambda: encode(
            data, panel=panel, output=output, overwrite=True, label_key=label_key, min_coverage=coverage
        ),
    )


def train_stage(
    *,
    ref_zarr: Path,
    query_zarr: Path,
    panel: Path,
    model: Path,
    options: Any,
    fraction: float | None,
    device: dict[str, Any],
) -> Stage:
    """The train stage: on the reference, or self-trained on the query as well."""
    from hitanno_cli.adaptation import self_train
    from hitanno_cli.training import train

    if fraction is None:
        return Stage(
            "train",
            model,
            {"options": asdict(options)},
            ["encode-reference"],
            make=lambda: train(ref_zarr, panel=panel, output=model, options=options, overwrite=True, **device),
        )
    return Stage(
        "train",
        model,
        {"options": asdict(options), "pseudo_label_fraction": fraction},
        ["encode-reference", "encode-query"],
        make=lambda: self_train(
            ref_zarr,
            query=query_zarr,
            panel=panel,
            output=model,
            options=options,
            fraction=fraction,
            overwrite=True,
            **device,
        ),
    )


def fingerprints(stages: list[Stage]) -> dict[str, str]:
    """Each stage's fingerprint: its params, its input files' content and its upstream."""
    file_hash: dict[Path, str] = {}
    out: dict[str, str] = {}
    for stage in stages:
        for path in stage.files:
            if path not in file_hash:
                file_hash[path] = artifacts.sha256_file(path)
        out[stage.name] = artifacts.sha256_json(
            {
                "stage": stage.name,
                "params": stage.params,
                "files": [file_hash[p] for p in stage.files],
                "upstream": [out[name] for name in stage.upstream],
            }
        )
    return out


def run(
    ref: str | Path,
    *,
    query: str | Path,
    output: str | Path,
    label_key: str | None = None,
    settings: RunSettings | None = None,
    from_stage: str | None = None,
) -> dict[str, Any]:
    """Run the stages whose outputs in ``output`` are out of date; return the manifest
    written to ``run.json``. ``label_key`` defaults to the reference's one obs column with a
    usual cell-type name, as in ``select-peaks``."""
    from hitanno_cli.h5ad import H5ad

    ref, query = Path(ref), Path(query)
    settings = RunSettings() if settings is None else settings
    if from_stage is not None and from_stage not in STAGES:
        raise UserError(f"--from {from_stage} is not a stage", f"use one of: {', '.join(STAGES)}")
    with H5ad(ref) as h5:
        label_key = h5.label_key(label_key)
    with outputs.writing(output, kind=RUN_FOLDER, overwrite=True, inputs=[ref, query]) as out:
        made = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        try:
            return _run(ref, query, label_key, out, settings=settings, from_stage=from_stage)
        except BaseException:
            if made and not any(out.iterdir()):  # refused before any stage wrote: leave nothing
                out.rmdir()
            raise


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is a folder ``run`` may work in: empty, or one it made (``run.json``)."""
    if not path.is_dir():
        return False
    return not any(path.iterdir()) or artifacts.kind_of(path / MANIFEST) == artifacts.RUN


#: What ``run -o`` works in.
RUN_FOLDER = (is_run_folder, "folder made by hitanno run (nor an empty one)")


def _run(
    ref: Path, query: Path, label_key: str, out: Path, *, settings: RunSettings, from_stage: str | None
) -> dict[str, Any]:
    stages = plan(ref, query, label_key, out, settings)
    prints = fingerprints(stages)
    manifest = _read_manifest(out)
    forced = STAGES[STAGES.index(from_stage) :] if from_stage else ()
    planned = {stage.name for stage in stages}
    for name, previous in manifest["stages"].items():  # e.g. annotate after --no-annotated-h5ad
        if name not in planned:
            manifest["stages"][name] = {**previous, "status": "skipped"}
    for stage in stages:
        previous = manifest["stages"].get(stage.name, {})
        fresh = stage.output.exists() and previous.get("fingerprint") == prints[stage.name]
        if fresh and stage.name not in forced:
            console.info(f"run: {stage.name} is up to date ({stage.output.name})")
            manifest["stages"][stage.name] = {**previous, "status": "cached"}
            continue
        console.info(f"run: {stage.name} → {stage.output.name}")
        if stage.output.is_dir() and stage.name == "train":
            shutil.rmtree(stage.output / "resume", ignore_errors=True)
        start = time.perf_counter()
        stage.make()
        manifest["stages"][stage.name] = {
            "status": "ran",
            "fingerprint": prints[stage.name],
            "output": stage.output.name,
            "seconds": round(time.perf_counter() - start, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_manifest(out, manifest)
    _write_manifest(out, manifest)
    return manifest


def _read_manifest(out: Path) -> dict[str, Any]:
    path = out / MANIFEST
    if not path.exists():
        return {"stages": {}}
    obj = artifacts.read_verified_json(path, artifacts.RUN, fix=f"remove {path} to run every stage again")
    return {"stages": dict(obj["stages"])}


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    header = artifacts.make_header(artifacts.RUN, {}, {})
    artifacts.write_verified_json(out / MANIFEST, {"header": header, "stages": manifest["stages"]})
