"""The Python API: one keyword-only function per stage, the same code the CLI runs."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

import hitanno_cli as ha

STAGES = ("select_peaks", "encode", "train", "self_train", "predict", "evaluate", "explain", "cluster", "run", "split")


@pytest.mark.parametrize("name", STAGES)
def test_stage_functions_take_only_their_main_input_positionally(name: str) -> None:
    parameters = list(inspect.signature(getattr(ha, name)).parameters.values())
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(positional) == 1, f"{name} takes {[p.name for p in positional]} positionally"
    assert all(p.kind is p.KEYWORD_ONLY for p in parameters[1:])


def test_importing_the_package_loads_no_stage() -> None:
    code = "import sys, hitanno_cli; print(any(m.startswith('hitanno_cli.') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        ha.no_such_stage  # noqa: B018


def test_api_and_cli_make_the_same_panel_and_annotate(small_pair: tuple[Path, Path], tmp_path: Path) -> None:
    ref, query = small_pair
    panel = ha.select_peaks(ref, label_key="cell_type", peaks_per_type=50)
    panel.save(tmp_path / "panel.json")
    assert (
        run_cli(
            "select-peaks",
            str(ref),
            "-l",
            "cell_type",
            "--peaks-per-type",
            "50",
            "-o",
            str(tmp_path / "cli.json"),
            "-q",
        ).exit_code
        == 0
    )
    assert json.loads((tmp_path / "cli.json").read_text())["content_hash"] == panel.content_hash

    store = ha.encode(ref, panel=tmp_path / "panel.json", output=tmp_path / "ref.zarr", label_key="cell_type")
    options = ha.recipe_options("default", epochs=2, seed=0)
    model = ha.train(store, panel=tmp_path / "panel.json", output=tmp_path / "model", options=options, device="cpu")
    predictions = ha.predict(model, h5ad=query, label_key="cell_type", output=tmp_path / "pred", device="cpu")
    metrics = ha.evaluate(
        predictions / "predictions.csv",
        truth=query,
        label_key="cell_type",
        output=tmp_path / "report",
        embedding_map=False,
    )
    assert metrics["n_cells"] == metrics["n_scored"] > 0
    assert 0.0 <= metrics["accuracy"] <= 1.0 and (tmp_path / "report" / "report.html").is_file()


def test_public_functions_stay_functions_after_any_stage_was_used() -> None:
    """A function of the package is never shadowed by a submodule of the same name, e.g.
    ``ha.annotate`` after ``ha.fit`` imported the module that defines both."""
    import importlib

    import hitanno_cli as ha

    for module in set(ha._API.values()):
        importlib.import_module(module)
    for name in ha._API:
        assert callable(getattr(ha, name)) and not isinstance(getattr(ha, name), type(ha)), name
