"""Shared fixtures: small simulated data sets and a CLI runner."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hitanno_cli.cli import app
from hitanno_cli.simulate import SimulationConfig, write_pair

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

SMALL = SimulationConfig(
    n_ref=500,
    n_query=250,
    n_peaks=600,
    n_types=4,
    n_lineages=2,
    programme_size=40,
    lineage_programme_size=40,
    min_type_cells=30,
    open_fraction=0.05,
    seed=1,
)


@pytest.fixture(scope="session")
def small_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small simulated (reference.h5ad, query.h5ad) pair, made once per session."""
    return write_pair(SMALL, tmp_path_factory.mktemp("sim"))


@pytest.fixture(scope="session")
def small_panel(small_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A panel selected from the small reference."""
    out = tmp_path_factory.mktemp("panel") / "panel.json"
    result = run_cli(
        "select-peaks", str(small_pair[0]), "-l", "cell_type", "-o", str(out), "--peaks-per-type", "50", "-q"
    )
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def stores(small_pair: tuple[Path, Path], small_panel: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Labelled reference and query stores encoded through the small panel (never modified by tests)."""
    root = tmp_path_factory.mktemp("stores")
    out = {"panel": small_panel, "ref": root / "ref.zarr", "query": root / "query.zarr"}
    for key, data in (("ref", small_pair[0]), ("query", small_pair[1])):
        result = run_cli("encode", str(data), "-p", str(small_panel), "-o", str(out[key]), "-l", "cell_type", "-q")
        assert result.exit_code == 0, result.stderr
    return out


def run_cli(*args: str):
    """Invoke the ``hitanno`` app in-process; returns click's Result (stdout, stderr apart)."""
    return CliRunner().invoke(app, list(args))


def granja_path() -> Path:
    """The real Granja data set, or skip the test when ../shared/data is absent."""
    path = SHARED_DATA / "granja2019_bmmc_atac.h5ad"
    if not path.exists():
        pytest.skip(f"real data not available ({path} is absent)")
    return path
