"""``hitanno simulate``, ``hitanno inspect`` and the top-level command line."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
from conftest import run_cli

from hitanno_cli import __version__


def test_version_and_help_list_every_stage() -> None:
    result = run_cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"hitanno {__version__}"
    listing = run_cli("--help").stdout
    for name in ("select-peaks", "encode", "simulate", "inspect"):
        assert name in listing
    encode_help = run_cli("encode", "--help").stdout
    assert "--min-coverage" in encode_help and "0.5" in encode_help


def test_simulate_has_stated_sparsity_and_type_spread(tmp_path) -> None:
    out = tmp_path / "sim"
    result = run_cli(
        "simulate", "-o", str(out), "--n-ref", "1200", "--n-query", "600", "--n-peaks", "2000", "--n-types", "8", "-q"
    )
    assert result.exit_code == 0, result.stderr
    ref, query = ad.read_h5ad(out / "reference.h5ad"), ad.read_h5ad(out / "query.h5ad")
    assert ref.shape == (1200, 2000) and query.shape == (600, 2000)
    open_share = (ref.X > 0).sum(axis=1).A1 / ref.n_vars
    assert 0.02 <= open_share.mean() <= 0.05
    assert open_share.std() > 0.005  # per-cell depth varies
    sizes = ref.obs["cell_type"].value_counts()
    assert sizes.max() / sizes.min() >= 5  # power-law sizes with rare types
    assert set(query.obs["cell_type"]) <= set(ref.obs["cell_type"].cat.categories)
    assert np.all(np.unique(ref.X.data) >= 1) and np.all(ref.X.data == np.round(ref.X.data))
    # the query is a shifted donor: its mean depth differs from the reference's
    q_share = (query.X > 0).sum(axis=1).A1 / query.n_vars
    assert abs(q_share.mean() - open_share.mean()) > 0.002
    assert run_cli("simulate", "-o", str(out), "-q").exit_code == 2  # exists, no --overwrite


def test_inspect_prints_headers(small_panel, small_pair, tmp_path) -> None:
    result = run_cli("inspect", str(small_panel))
    assert result.exit_code == 0
    header = json.loads(result.stdout)["header"]
    assert header["format"] == "hitanno.panel" and header["params"]["peaks_per_type"] == 50
    store = tmp_path / "q.zarr"
    assert run_cli("encode", str(small_pair[1]), "-p", str(small_panel), "-o", str(store), "-q").exit_code == 0
    meta = json.loads(run_cli("inspect", str(store)).stdout)
    assert meta["header"]["format"] == "hitanno.sentences" and meta["n_cells"] == 250
    assert run_cli("inspect", str(tmp_path / "missing")).exit_code == 2
