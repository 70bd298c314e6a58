"""``run``: the whole pipeline in one command, skipping stages that are up to date."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from hitanno_cli import console
from hitanno_cli.commands.common import Quiet, command, split_list
from hitanno_cli.errors import UserError
from hitanno_cli.pipeline import STAGES, RunSettings, run


def train_options(overrides: dict[str, Any], extra: list[str], recipe: str = "default") -> Any:
    """TrainOptions of a recipe, then the named options, then ``KEY=VALUE`` pairs (model sizes included)."""
    from hitanno_cli.model import ModelConfig
    from hitanno_cli.training import TrainOptions, recipe_options

    fields = {f.name: f for f in dataclasses.fields(TrainOptions) if f.name != "model"}
    model_fields = {f.name: f for f in dataclasses.fields(ModelConfig) if f.name not in ("n_types", "peaks_per_type")}
    values: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    model: dict[str, Any] = {}
    for item in extra:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or (key not in fields and key not in model_fields):
            known = ", ".join(sorted([*fields, *model_fields]))
            raise UserError(f"--train-option '{item}' is not KEY=VALUE with a known key", f"keys: {known}")
        default = (fields.get(key) or model_fields[key]).default
        try:
            value = type(default)(text) if not isinstance(default, bool) else text.lower() in ("1", "true", "yes")
        except ValueError:
            raise UserError(f"--train-option {item}: '{text}' is not a {type(default).__name__}", "fix the value") from None
        (values if key in fields else model)[key] = value
    return recipe_options(recipe, **values, model=model)


@command
def run_cmd(
    ref: Annotated[Path, typer.Option("--ref", help="Labelled reference .h5ad (raw counts).")],
    query: Annotated[Path, typer.Option("--query", help="Query .h5ad to annotate (labels optional).")],
    label_key: Annotated[str, typer.Option("--label-key", "-l", help="obs column of cell types.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for every artifact and run.json.")],
    from_stage: Annotated[
        Optional[str], typer.Option("--from", help=f"Rerun this stage and all after it: {', '.join(STAGES)}.")
    ] = None,
    peaks_per_type: Annotated[Optional[int], typer.Option(help="Peaks per type (default: published formula).")] = None,
    min_cells: Annotated[int, typer.Option(help="Refuse reference types with fewer cells.")] = 10,
    exclude_types: Annotated[Optional[str], typer.Option(help="Comma-separated types to leave out.")] = None,
    min_coverage: Annotated[float, typer.Option(help="Refuse a query holding less of the panel.")] = 0.5,
    recipe: Annotated[str, typer.Option(help="Training recipe: default or published (see hitanno train).")] = "default",
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs (default: hitanno train's).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Training batch size (default: hitanno train's).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default: hitanno train's).")] = None,
    class_weight: Annotated[Optional[str], typer.Option(help="none or balanced (default: hitanno train's).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Training seed (default: hitanno train's).")] = None,
    train_option: Annotated[
        Optional[list[str]], typer.Option(help="Any other hitanno train option as KEY=VALUE (repeatable).")
    ] = None,
    self_train: Annotated[bool, typer.Option("--self-train/--no-self-train", help="Self-train on the query "
                                             "(hitanno train --adapt-to): pseudo-label its most confident cells "
                                             "and train again on both.")] = False,
    pseudo_label_fraction: Annotated[float, typer.Option(help="With --self-train: share of each predicted "
                                                         "type's query cells that are pseudo-labelled.")] = 0.3,
    min_confidence: Annotated[float, typer.Option(help="Unassigned below this probability.")] = 0.0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda:N.")] = "auto",
    gpu: Annotated[Optional[int], typer.Option(help="Shorthand for --device cuda:N.")] = None,
    quiet: Quiet = False,
) -> None:
    """Run select-peaks → encode → train → predict → evaluate, skipping up-to-date stages."""
    options = train_options({"epochs": epochs, "batch_size": batch_size, "lr": lr,
                             "class_weight": class_weight, "seed": seed}, train_option or [], recipe)
    settings = RunSettings(peaks_per_type=peaks_per_type, min_cells=min_cells,
                           exclude_types=split_list(exclude_types), min_coverage=min_coverage,
                           min_confidence=min_confidence, device=device, gpu=gpu, train=options,
                           pseudo_label_fraction=pseudo_label_fraction if self_train else None)
    manifest = run(ref, query, label_key, output, settings, from_stage)
    ran = [name for name, s in manifest["stages"].items() if s["status"] == "ran"]
    console.info(f"run: ran {', '.join(ran) or 'nothing (all up to date)'}; manifest → {output / 'run.json'}")
    if "evaluate" in manifest["stages"]:
        from hitanno_cli.commands.evaluate import print_summary

        metrics = json.loads((output / "report" / "metrics.json").read_text())
        print_summary(metrics, output / "report")
    else:
        console.info(f"run: predictions → {output / 'predictions' / 'predictions.csv'}")
