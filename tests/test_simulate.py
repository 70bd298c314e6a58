"""The streamed simulation: blocks written as one CSR ``.h5ad``, and counts that follow the model."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from hitanno_cli.errors import UserError
from hitanno_cli.h5ad import H5ad
from hitanno_cli.simulate import cell_blocks, draw, simulation_config, write_h5ad_blocks


def test_blocks_written_one_at_a_time_read_back_as_one_matrix(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    blocks = [sp.random(n, 300, density=0.05, format="csr", dtype=np.float32, random_state=rng) for n in (7, 64, 1, 30)]
    obs = pd.DataFrame({"cell_type": pd.Categorical(rng.choice(["a", "b"], 102))}, index=[f"c{i}" for i in range(102)])
    var = pd.DataFrame(index=[f"chr1:{i * 1000}-{i * 1000 + 500}" for i in range(300)])
    seen: list[int] = []
    write_h5ad_blocks(tmp_path / "x.h5ad", iter(blocks), obs=obs, var=var, on_block=seen.append)
    assert seen == [7, 64, 1, 30]
    whole = sp.vstack(blocks).tocsr()
    adata = ad.read_h5ad(tmp_path / "x.h5ad")
    assert (adata.X != whole).nnz == 0 and list(adata.obs_names) == list(obs.index)
    assert adata.obs["cell_type"].equals(obs["cell_type"]) and list(adata.var_names) == list(var.index)
    with H5ad(tmp_path / "x.h5ad") as h5:  # hitanno's own chunked reader sees the same rows
        rows = [chunk for _, chunk in h5.iter_chunks(chunk_rows=25)]
    assert (sp.vstack(rows).tocsr() != whole).nnz == 0


def test_simulated_reads_follow_depth_and_type() -> None:
    cfg = simulation_config(
        n_ref=3000, n_query=600, n_peaks=2000, n_types=6, open_fraction=0.05, batch_peak_share=0.1, seed=3
    )
    sim = draw(cfg)
    ref = sim.donors[0]
    settings = {"n_peaks": cfg.n_peaks, "open_fraction": cfg.open_fraction, "seed": cfg.seed, "block_cells": 700}
    blocks = list(cell_blocks(ref, **settings))
    assert [b.shape[0] for b in blocks] == [700, 700, 700, 700, 200]
    counts = sp.vstack(blocks).tocsr()
    reads = np.asarray(counts.sum(axis=1)).ravel()
    expected = ref.depth * cfg.open_fraction * cfg.n_peaks
    assert abs(reads.mean() / expected.mean() - 1) < 0.02  # Poisson reads around the depth
    assert np.corrcoef(reads, expected)[0, 1] > 0.9
    probabilities = np.diff(ref.cdf, axis=1, prepend=np.arange(len(ref.cdf))[:, None])
    for t in range(cfg.n_types):  # each type's mean profile is its peak distribution
        profile = np.asarray(counts[ref.labels == t].mean(axis=0)).ravel()
        assert np.corrcoef(profile, probabilities[t])[0, 1] > 0.9
    again = sp.vstack(list(cell_blocks(ref, **settings))).tocsr()
    assert (again != counts).nnz == 0  # seeded


def test_programme_share_and_boost_set_how_telling_the_reads_are() -> None:
    sizes = {"n_ref": 400, "n_query": 100, "n_peaks": 4000, "n_types": 4, "open_fraction": 0.05}
    common = {**sizes, "batch_peak_share": 0.0, "seed": 1}
    default, harder = simulation_config(**common), simulation_config(**common, programme_share=0.01, programme_boost=3)
    assert (default.programme_size, default.lineage_programme_size) == (200, 267)
    assert (harder.programme_size, harder.lineage_programme_size, harder.programme_boost) == (40, 53, 3)

    def programme_reads(cfg) -> float:
        """Share of the reads that land on a cell's own type's programme."""
        donor = draw(cfg).donors[0]
        counts = sp.vstack(list(cell_blocks(donor, n_peaks=cfg.n_peaks, open_fraction=cfg.open_fraction, seed=1)))
        p = np.diff(donor.cdf, axis=1, prepend=np.arange(len(donor.cdf))[:, None])
        own = p > np.median(p, axis=0) * 1.5  # each type's boosted peaks stand above the others'
        return float(counts.multiply(own[donor.labels]).sum() / counts.sum())

    assert programme_reads(harder) < 0.5 * programme_reads(default)


@pytest.mark.parametrize("bad", [{"programme_share": 0.0}, {"programme_share": 0.7}, {"programme_boost": 1.0}])
def test_impossible_programmes_are_refused(bad: dict) -> None:
    sizes = {"n_ref": 400, "n_query": 100, "n_peaks": 4000, "n_types": 4, "open_fraction": 0.05}
    with pytest.raises(UserError, match="programme"):
        simulation_config(**sizes, batch_peak_share=0.1, seed=0, **bad)
