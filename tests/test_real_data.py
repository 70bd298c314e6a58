"""Part 1 on the real Granja scATAC-seq set (skipped when ../shared/data is absent)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from conftest import granja_path, run_cli

from hitanno_cli.panel import Panel
from hitanno_cli.sentences import SentenceStore


@pytest.mark.slow
def test_granja_cross_donor_select_and_encode(tmp_path) -> None:
    full = ad.read_h5ad(granja_path())
    paths = {}
    for donor in ("BMMC_D6T1", "BMMC_D5T1"):
        paths[donor] = tmp_path / f"{donor}.h5ad"
        full[full.obs["donor"] == donor].copy().write_h5ad(paths[donor])
    panel_path = tmp_path / "panel.json"
    result = run_cli("select-peaks", str(paths["BMMC_D6T1"]), "-l", "cell_type", "-o", str(panel_path), "-q")
    assert result.exit_code == 0, result.stderr
    panel = Panel.load(panel_path)
    assert panel.n_types == 16 and panel.peaks_per_type == 625  # capped: 16 × 625 = all 10 000 peaks
    assert panel.sets[0].cell_type == "21_CD4.N2"  # the rarest type picks first
    for donor, path in paths.items():
        out = tmp_path / f"{donor}.zarr"
        result = run_cli("encode", str(path), "-p", str(panel_path), "-o", str(out), "-l", "cell_type", "-q")
        assert result.exit_code == 0, result.stderr
        store = SentenceStore(out)
        subset = full[full.obs["donor"] == donor]
        assert store.n_cells == subset.n_obs
        assert store.meta["coverage"]["found"] == store.meta["coverage"]["of"] == 10_000
        assert store.labels().tolist() == subset.obs["cell_type"].astype(str).tolist()
        dense = store.read_dense(0, 500)
        assert dense.shape == (500, 16, 625)
        np.testing.assert_array_equal(
            dense.reshape(500, -1).sum(axis=1), (subset.X[:500] > 0).sum(axis=1).A1
        )  # every open peak kept
