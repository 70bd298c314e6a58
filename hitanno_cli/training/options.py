"""What a training run is told: its options, the named recipes, and parsing them.

``TrainOptions()`` is the published HitAnno schedule (``--recipe published``): a
stratified 25 % validation split, Adam at lr 1e-4, linear warm-up over 3 epochs then
linear decay to 0 at epoch 20, the weights of the best validation loss, early stopping
after 3 epochs without improvement (not before epoch 5), seed 42. ``--recipe default`` is
the project's measured recipe (``docs/recipe.md``): a short fixed schedule on every
reference cell, AdamW, faster per-peak tables, depth augmentation, label smoothing,
class weights, a narrow embedding and the linear path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hitanno_cli.errors import UserError

#: Default bound on cells held in memory by the shuffle buffer (8 bytes per open peak:
#: ~260 MB at 164 open peaks per cell).
BUFFER_CELLS = 200_000

#: How training cells are drawn: each once per epoch (``uniform``), or with replacement at
#: a rate per class ∝ 1/size (``balanced``) or 1/√size (``sqrt``), for rare types.
SAMPLING = ("uniform", "balanced", "sqrt")

#: Share of the query cells of each predicted type that self-training pseudo-labels.
PSEUDO_LABEL_FRACTION = 0.3


@dataclass
class TrainOptions:
    """Everything that determines a training run's result (compared on ``--resume``)."""

    epochs: int = 20
    warmup_epochs: float = 3.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: str = "adam"
    batch_size: int = 64
    min_steps_per_epoch: int = 0
    val_fraction: float = 0.25
    patience: int = 3
    min_epochs: int = 5
    seed: int = 42
    class_weight: str = "none"
    sampling: str = "uniform"
    label_smoothing: float = 0.0
    peak_dropout: float = 0.0
    embed_init: str = "random"
    embed_lr_scale: float = 1.0
    precision: str = "auto"
    buffer_cells: int = BUFFER_CELLS
    model: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Refuse options that cannot work, before any work is done."""
        rules = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.min_steps_per_epoch >= 0, "--min-steps-per-epoch must be non-negative"),
            (0 <= self.val_fraction < 1, "--val-fraction must be in [0, 1)"),
            (self.lr > 0, "--lr must be positive"),
            (self.warmup_epochs >= 0, "--warmup-epochs must be non-negative"),
            (self.class_weight in ("none", "balanced"), "--class-weight must be none or balanced"),
            (self.sampling in SAMPLING, f"--sampling must be one of {', '.join(SAMPLING)}"),
            (self.optimizer in ("adam", "adamw"), "--optimizer must be adam or adamw"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (0 <= self.peak_dropout < 1, "--peak-dropout must be in [0, 1)"),
            (self.embed_init in ("random", "lsi"), "--embed-init must be random or lsi"),
            (self.embed_lr_scale > 0, "--embed-lr-scale must be positive"),
            (self.precision in ("auto", "fp32", "bf16"), "--precision must be auto, fp32 or bf16"),
            (self.buffer_cells >= 1, "--buffer-cells must be at least 1"),
        ]
        for ok, message in rules:
            if not ok:
                raise UserError(message, "see hitanno train --help")


#: Named sets of option values. ``published`` is the published schedule (the TrainOptions
#: defaults); ``default`` is the recipe the study of ``docs/recipe.md`` chose.
RECIPES: dict[str, dict[str, Any]] = {
    "published": {},
    "default": {
        "lr": 1e-3,
        "batch_size": 256,
        "min_steps_per_epoch": 16,
        "optimizer": "adamw",
        "weight_decay": 0.05,
        "epochs": 8,
        "warmup_epochs": 2.0,
        "val_fraction": 0.0,
        "peak_dropout": 0.5,
        "label_smoothing": 0.3,
        "class_weight": "balanced",
        "embed_lr_scale": 30.0,
        "model": {"embed_dim": 16, "linear_path": True},
    },
}


def recipe_options(name: str = "default", **overrides: Any) -> TrainOptions:
    """The TrainOptions of a named recipe, with explicit values taking precedence.

    ``overrides["model"]`` is merged into the recipe's model sizes, not put in their place.
    """
    if name not in RECIPES:
        raise UserError(f"unknown recipe '{name}'", f"choose one of {', '.join(RECIPES)}")
    values = {**RECIPES[name], **overrides}
    model = {**RECIPES[name].get("model", {}), **overrides.get("model", {})}
    return TrainOptions(**{**values, "model": model})


def model_options(*, heads: int | None = None, ff: int | None = None, **sizes: Any) -> dict[str, Any]:
    """Model config values from the command line's names: ``heads`` and ``ff`` set both
    levels; any other size is a :class:`~hitanno_cli.model.ModelConfig` field. Unset
    (None) values are left out, so the recipe's or the config's default applies."""
    both = {"level1_heads": heads, "level2_heads": heads, "level1_ff": ff, "level2_ff": ff}
    return {key: value for key, value in {**sizes, **both}.items() if value is not None}


def options_with_assignments(recipe: str, named: dict[str, Any], assignments: list[str]) -> TrainOptions:
    """A recipe's options, then the ``named`` ones (None: unset), then ``KEY=VALUE`` texts.

    A key is a TrainOptions field or a model config field (``embed_dim=32``); its value
    is parsed as the type of that field's default.
    """
    from hitanno_cli.model import ModelConfig

    fields = {f.name: f for f in dataclasses.fields(TrainOptions) if f.name != "model"}
    model_fields = {f.name: f for f in dataclasses.fields(ModelConfig) if f.name not in ("n_types", "peaks_per_type")}
    values: dict[str, Any] = {k: v for k, v in named.items() if v is not None}
    model: dict[str, Any] = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or (key not in fields and key not in model_fields):
            known = ", ".join(sorted([*fields, *model_fields]))
            raise UserError(f"--train-option '{item}' is not KEY=VALUE with a known key", f"keys: {known}")
        default = (fields.get(key) or model_fields[key]).default
        (values if key in fields else model)[key] = _parse_as(default, text, item)
    return recipe_options(recipe, **values, model=model)


def _parse_as(default: Any, text: str, item: str) -> Any:
    """``text`` as a value of ``default``'s type (booleans: 1/true/yes)."""
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes")
    try:
        return type(default)(text)
    except ValueError:
        raise UserError(f"--train-option {item}: '{text}' is not a {type(default).__name__}", "fix the value") from None
