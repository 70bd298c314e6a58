"""Peak selection: TF-IDF, Welch t-test and the rare-first merge against direct computations."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from hitanno_cli.h5ad import H5ad
from hitanno_cli.panel import Panel
from hitanno_cli.selection import (
    published_peaks_per_type,
    rare_first_sets,
    reference_moments,
    select_peaks,
    type_codes,
    welch_t,
)


def _random_counts(rng: np.random.Generator, n_cells: int = 120, n_peaks: int = 40) -> sp.csr_matrix:
    dense = rng.poisson(0.4, size=(n_cells, n_peaks)).astype(np.float32)
    dense[:, 3] = 0  # a peak no cell opens
    dense[5] = 0  # a cell with no counts
    return sp.csr_matrix(dense)


def _dense_tfidf(x: np.ndarray) -> np.ndarray:
    """The published formula, computed densely."""
    cell_total = x.sum(axis=1, keepdims=True)
    peak_total = x.sum(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.log(1 + 1e4 * (x / cell_total) * (x.shape[0] / peak_total))
    return np.where(x > 0, value, 0.0)


@pytest.mark.parametrize("blocks", [(7, 6), (1 << 16, 8192)], ids=["small-blocks", "one-block"])
@pytest.mark.parametrize("types", [["a", "b", "c"], ["a", "b"]], ids=["all-types", "c-left-out"])
@pytest.mark.parametrize("cache_bytes", [0, 1 << 28], ids=["re-read", "cached"])
def test_streamed_tfidf_ttest_equals_dense_scipy(tmp_path, monkeypatch, cache_bytes, types, blocks) -> None:
    """Per-type moments and t statistics equal a dense computation, whatever the chunks and
    blocks (of cells' entries, and of peaks in the t-test); cells of a type left out count
    nowhere (neither in TF-IDF totals nor in the rest)."""
    import hitanno_cli.selection as selection

    monkeypatch.setattr(selection, "CACHE_BYTES", cache_bytes)
    block_nnz, t_block = blocks  # entries per block of the moments, peaks per block of the t-test
    monkeypatch.setattr(selection, "BLOCK_NNZ", block_nnz)
    monkeypatch.setattr(selection, "T_TEST_BLOCK", t_block)
    rng = np.random.default_rng(0)
    x = _random_counts(rng)
    labels = rng.choice(["a", "b", "c"], size=x.shape[0])
    path = tmp_path / "r.h5ad"
    ad.AnnData(X=x, obs=pd.DataFrame({"t": labels}, index=[f"c{i}" for i in range(x.shape[0])])).write_h5ad(path)
    with H5ad(path) as h5:
        moments = reference_moments(h5, type_codes(h5.labels("t"), types), len(types), chunk_rows=17)
    scores = welch_t(moments.sums, moments.sumsq, moments.n_per_type)
    kept = np.isin(labels, types)
    values = _dense_tfidf(x.toarray()[kept].astype(np.float64))
    for t, name in enumerate(types):
        inside, rest = values[labels[kept] == name], values[labels[kept] != name]
        np.testing.assert_allclose(moments.sums[t], inside.sum(axis=0), rtol=1e-9)
        np.testing.assert_allclose(moments.sumsq[t], (inside**2).sum(axis=0), rtol=1e-9)
        expected = stats.ttest_ind(inside, rest, equal_var=False).statistic
        expected = np.nan_to_num(expected, nan=0.0)
        np.testing.assert_allclose(scores[t], expected, rtol=1e-5, atol=1e-8)
    assert np.all(scores[:, 3] == 0)  # constant (all-zero) peak: NaN statistic → 0


def test_rare_first_merge_on_hand_made_case() -> None:
    # peak:           0    1    2    3    4    5
    scores = np.array(
        [
            [9.0, 8.0, 7.0, 1.0, 0.5, 0.1],  # common type (100 cells)
            [8.5, 0.0, 0.0, 9.0, 0.2, 0.0],  # rare type (10 cells)
            [9.5, 9.4, 0.0, 0.0, 0.0, 5.0],  # middle type (50 cells)
        ]
    )
    order, sets = rare_first_sets(scores, np.array([100, 10, 50]), peaks_per_type=2, n_candidates=6300)
    assert order == [1, 2, 0]
    assert sets[0].tolist() == [3, 0]  # rare takes its best two
    assert sets[1].tolist() == [1, 5]  # middle loses peak 0 to the rare type
    assert sets[2].tolist() == [2, 4]  # common takes what is left, best first
    assert len(set(np.concatenate(sets).tolist())) == 6


def test_rare_first_refuses_more_peaks_than_exist() -> None:
    from hitanno_cli.errors import UserError

    with pytest.raises(UserError, match="--peaks-per-type 2"):
        rare_first_sets(np.zeros((3, 7)), np.array([1, 2, 3]), peaks_per_type=3)


def test_published_formula() -> None:
    assert published_peaks_per_type(9) == 2000
    assert published_peaks_per_type(16) == 1500
    assert published_peaks_per_type(30) == 1095


def test_select_peaks_on_simulated_reference(small_pair, small_panel) -> None:
    panel = Panel.load(small_panel)
    assert panel.n_types == 4 and panel.peaks_per_type == 50
    names = panel.flat_names()
    assert len(set(names)) == panel.size  # no peak in two sets
    counts = [s.n_cells for s in panel.sets]
    assert counts == sorted(counts)  # rare types first
    first = panel.sets[0]
    assert first.score == sorted(first.score, reverse=True)  # best first
    assert first.chrom[0].startswith("chr") and first.end[0] - first.start[0] == 500
    assert panel.header["inputs"]["reference"].startswith("sha256:")
    assert panel.header["params"]["peaks_per_type"] == 50


def test_select_peaks_default_size_is_capped_and_exclusion_works(small_pair) -> None:
    panel = select_peaks(small_pair[0], label_key="cell_type", exclude_types=["type_00_L0"])
    assert "type_00_L0" not in panel.cell_types and panel.n_types == 3
    assert panel.peaks_per_type == min(published_peaks_per_type(3), 600 // 3)
