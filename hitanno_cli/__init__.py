"""hitanno: cell-type annotation of scATAC-seq with a hierarchical transformer (HitAnno),
and clustering of unlabelled cells with an attention autoencoder (AttentionAE-sc).

One keyword-only function per stage; the command line is a thin layer over them::

    import hitanno_cli as ha

    panel = ha.select_peaks("ref.h5ad", label_key="cell_type")
    panel.save("panel.json")
    ha.encode("ref.h5ad", panel="panel.json", output="ref.zarr", label_key="cell_type")
    ha.train("ref.zarr", panel="panel.json", output="model")
    ha.predict("model", h5ad="query.h5ad", output="predictions")

or, in a notebook, on AnnData objects::

    model = ha.fit(reference, label_key="cell_type", output="model")
    query = ha.annotate(query, model=model)    # obs["hitanno_label"], obsm["X_hitanno"], …

The functions are imported on first use, so ``import hitanno_cli`` stays quick.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Each public function and the module that defines it.
_API = {
    "select_peaks": "hitanno_cli.selection",
    "encode": "hitanno_cli.sentences",
    "train": "hitanno_cli.training",
    "self_train": "hitanno_cli.adaptation",
    "predict": "hitanno_cli.prediction",
    "evaluate": "hitanno_cli.evaluation",
    "explain": "hitanno_cli.explanation",
    "cluster": "hitanno_cli.clustering",
    "run": "hitanno_cli.pipeline",
    "split": "hitanno_cli.splitting",
    "annotate": "hitanno_cli.annotation",
    "fit": "hitanno_cli.annotation",
    "write_annotated_h5ad": "hitanno_cli.anndata_io",
    "recipe_options": "hitanno_cli.training",
    "Panel": "hitanno_cli.panel",
    "SentenceStore": "hitanno_cli.sentences",
    "TrainOptions": "hitanno_cli.training",
    "RunSettings": "hitanno_cli.pipeline",
    "UserError": "hitanno_cli.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'hitanno_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
