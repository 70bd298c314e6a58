"""What training minimises and how fast: the weighted loss, the optimiser's parameter
groups and the learning-rate schedule."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from hitanno_cli.model import HitAnno


def weighted_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None,
    *,
    smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy (with label smoothing) where each *cell* weighs its class's weight.

    Not ``F.cross_entropy(weight=…)``: with label smoothing that also weighs the smoothing
    mass of every *other* class by its weight, which pushes every cell toward the rare
    types. ``mean`` divides by the weights' sum.
    """
    per_cell = F.cross_entropy(logits, targets, reduction="none", label_smoothing=smoothing)
    if weights is None:
        return per_cell.mean() if reduction == "mean" else per_cell.sum()
    w = weights[targets]
    total = (per_cell * w).sum()
    return total / w.sum().clamp(min=1e-12) if reduction == "mean" else total


def parameter_groups(model: HitAnno, lr: float, embed_scale: float) -> list[dict[str, Any]]:
    """Optimiser groups: the per-peak tables (token embeddings, linear path) learn at
    ``lr · embed_scale``, since each of their rows sees only the cells where it matters."""
    tables = list(model.embed.parameters()) + (list(model.linear.parameters()) if model.linear is not None else [])
    ids = {id(t) for t in tables}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": rest, "lr": lr}, {"params": tables, "lr": lr * embed_scale}]


def lr_factor(step: int, steps_per_epoch: int, warmup_epochs: float, epochs: int) -> float:
    """Linear warm-up to 1 over ``warmup_epochs``, then linear decay to 0 at ``epochs``."""
    warm = warmup_epochs * steps_per_epoch
    total = epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    if total <= warm:
        return 1.0
    return max(0.0, (total - step) / (total - warm))
