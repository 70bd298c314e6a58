"""Training HitAnno: :mod:`.options` (what a run is told, the named recipes),
:mod:`.data` (the training cells), :mod:`.objective` (loss, parameter groups, schedule)
:mod:`.trainer` (one run and its saved state) and :mod:`.fit` (the ``train`` stage).

Names are imported on first use: reading the options (the command line does, to show
its defaults) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "PSEUDO_LABEL_FRACTION": "options",
    "RECIPES": "options",
    "SAMPLING": "options",
    "TrainOptions": "options",
    "model_options": "options",
    "options_with_assignments": "options",
    "recipe_options": "options",
    "Interrupted": "fit",
    "Trainer": "trainer",
    "train": "fit",
}

__all__ = list(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
