"""Peak matching across naming styles: dash names, Ensembl chromosomes, and the coverage line."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
from conftest import SHARED_DATA, run_cli

from hitanno_cli.genome import parse_peak_name, peak_intervals
from hitanno_cli.panel import Panel
from hitanno_cli.sentences import PeakMatch, SentenceStore, match_panel


def _ensembl(chrom: str) -> str:
    return chrom.removeprefix("chr")


STYLES = {
    "ensembl": lambda c, s, e: f"{_ensembl(c)}:{s}-{e}",  # 1:100-200
    "dash": lambda c, s, e: f"{c}-{s}-{e}",  # chr1-100-200
    "ensembl_dash": lambda c, s, e: f"{_ensembl(c)}-{s}-{e}",  # 1-100-200
}


def _restyled(query: Path, style: str, out: Path) -> Path:
    """The query with its peaks renamed in ``style`` and no chrom/start/end var columns."""
    adata = ad.read_h5ad(query)
    names = [STYLES[style](c, s, e) for c, s, e in zip(adata.var["chrom"], adata.var["start"], adata.var["end"])]
    var = adata.var.drop(columns=["chrom", "start", "end"]).set_axis(names)
    renamed = ad.AnnData(X=adata.X, obs=adata.obs, var=var)
    renamed.write_h5ad(out)
    return out


@pytest.mark.parametrize("style", sorted(STYLES))
def test_encode_matches_peaks_named_in_another_style(style, small_pair, stores, tmp_path) -> None:
    data = _restyled(small_pair[1], style, tmp_path / f"{style}.h5ad")
    out = tmp_path / f"{style}.zarr"
    result = run_cli("encode", str(data), "-p", str(stores["panel"]), "-o", str(out), "-l", "cell_type")
    assert result.exit_code == 0, result.stderr
    panel = Panel.load(stores["panel"])
    store, original = SentenceStore(out), SentenceStore(stores["query"])
    assert store.meta["coverage"] == {"found": panel.size, "of": panel.size, "by_name": 0, "by_overlap": panel.size}
    np.testing.assert_array_equal(store.read_dense(0, store.n_cells), original.read_dense(0, original.n_cells))
    assert store.labels().tolist() == original.labels().tolist()
    line = next(line for line in result.stderr.splitlines() if "panel peaks found" in line)
    assert f"{panel.size} by overlap" in line and "coverage 1.000" in line
    if style.startswith("ensembl"):
        assert f"{panel.size} of them via chromosome names without 'chr' matched to 'chr…'" in line
    else:
        assert "chromosome" not in line  # same chromosome names: nothing to translate


def test_match_panel_counts_renamed_chromosomes(small_panel) -> None:
    panel = Panel.load(small_panel)
    iv = panel.flat_intervals()
    names = np.array([f"{_ensembl(c)}:{s}-{e}" for c, s, e in zip(iv.chrom, iv.start, iv.end)], dtype=object)
    names[:10] = panel.flat_names()[:10]  # found by name
    match = match_panel(panel, names, lambda: None)
    assert (match.by_name, match.by_overlap, match.renamed_chromosomes) == (10, panel.size - 10, panel.size - 10)
    assert match.coverage == 1.0 and match.maps_every_column
    assert all(p == "chr" + d for d, p in match.chromosome_renames)
    assert match.lookup.tolist() == np.arange(panel.size).tolist()


def test_match_panel_reads_coordinates_from_var_when_present(small_panel) -> None:
    """With chrom/start/end columns in ``var`` the names are not parsed (they may be anything)."""
    import pandas as pd

    panel = Panel.load(small_panel)
    iv = panel.flat_intervals()
    var = pd.DataFrame({"chrom": [_ensembl(c) for c in iv.chrom], "start": iv.start, "end": iv.end})
    match = match_panel(panel, np.array([f"peak{i}" for i in range(panel.size)]), lambda: var)
    assert match.coverage == 1.0 and match.renamed_chromosomes == panel.size


def test_describe_says_how_peaks_were_matched() -> None:
    def match(**kw) -> PeakMatch:
        return PeakMatch.from_pairs(np.arange(4), np.arange(4), n_columns=4, n_panel=4, **kw)

    plain = match(by_name=1, by_overlap=3)
    assert plain.describe("q.h5ad") == "4/4 panel peaks found in q.h5ad (1 by name, 3 by overlap; coverage 1.000)"
    added = match(by_name=0, by_overlap=4, renamed_chromosomes=4, chromosome_renames=(("1", "chr1"), ("MT", "chrM")))
    assert added.describe("q.h5ad") == (
        "4/4 panel peaks found in q.h5ad (0 by name, 4 by overlap, 4 of them via chromosome names "
        "without 'chr' matched to 'chr…'; coverage 1.000)"
    )
    dropped = match(by_name=0, by_overlap=4, renamed_chromosomes=2, chromosome_renames=(("chrX", "X"),))
    assert "2 of them via 'chr…' chromosome names matched to names without 'chr'" in dropped.describe("q")
    mito = match(by_name=3, by_overlap=1, renamed_chromosomes=1, chromosome_renames=(("MT", "chrM"),))
    assert "1 of them via translated chromosome names ('MT' to 'chrM')" in mito.describe("q")
    assert "\n" not in mito.describe("q")


def test_every_buenrostro_peak_name_parses() -> None:
    path = SHARED_DATA / "buenrostro2015_atac.h5ad"
    if not path.exists():
        pytest.skip(f"real data not available ({path} is absent)")
    with h5py.File(path, "r") as f:
        var = f["var"]
        names = np.array([n.decode() if isinstance(n, bytes) else str(n) for n in var[var.attrs["_index"]][:]])
    assert names.size > 0 and names[0].count("-") == 2  # dash style, chr1-1051395-1051894
    assert all(parse_peak_name(n) is not None for n in names)
    iv = peak_intervals(names)
    assert iv.known.all() and all(str(c).startswith("chr") for c in iv.chrom)
