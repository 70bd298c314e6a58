"""A broken, empty or odd ``.h5ad`` gets one ``error:`` line naming it, exit status 2, and no output."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import run_cli

from hitanno_cli import hdf5_chunks
from hitanno_cli.panel import Panel


def _write(
    path: Path,
    x,
    *,
    labels=None,
    obs_names=None,
    layers: dict | None = None,
    compression: str | None = None,
) -> Path:
    n_obs, n_vars = x.shape
    names = [f"chr1:{i * 1000}-{i * 1000 + 500}" for i in range(n_vars)]
    labels = labels if labels is not None else np.repeat(["a", "b"], [n_obs // 2, n_obs - n_obs // 2])
    obs = pd.DataFrame({"cell_type": labels}, index=obs_names or [f"c{i}" for i in range(n_obs)])
    with warnings.catch_warnings():  # anndata warns of duplicate obs names, which one test wants
        warnings.simplefilter("ignore", UserWarning)
        adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=names), layers=layers)
        adata.write_h5ad(path, compression=compression)
    return path


def _counts(seed: int = 0, n_obs: int = 40, n_vars: int = 30) -> sp.csr_matrix:
    return sp.csr_matrix(np.random.default_rng(seed).poisson(0.5, size=(n_obs, n_vars)).astype(np.float32))


def _assert_refused(args: list[str], match: str, out: Path) -> str:
    """Run the CLI; check exit 2, one ``error:`` line (the last) containing ``match``, nothing written."""
    before = sorted(out.parent.iterdir()) if out.parent.exists() else []
    result = run_cli(*args)
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert match in errors[0], errors[0]
    after = sorted(out.parent.iterdir()) if out.parent.exists() else []
    assert after == before, "an artifact or temporary file was left behind"
    assert not out.exists()
    return errors[0]


def _select(ref: Path, out: Path, *extra: str) -> list[str]:
    return ["select-peaks", str(ref), "-l", "cell_type", "-o", str(out), "--min-cells", "5", "-q", *extra]


@pytest.fixture()
def good(tmp_path) -> Path:
    return _write(tmp_path / "good.h5ad", _counts())


@pytest.fixture()
def panel(tmp_path, good) -> Path:
    out = tmp_path / "panel.json"
    result = run_cli(*_select(good, out, "--peaks-per-type", "5"))
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture()
def truncated(tmp_path, good) -> Path:
    data = good.read_bytes()
    path = tmp_path / "truncated.h5ad"
    path.write_bytes(data[: len(data) // 2])
    return path


# -- 1. truncated or damaged files ------------------------------------------------------------
def test_truncated_file_in_select_peaks(truncated, tmp_path) -> None:
    out = tmp_path / "o" / "panel.json"
    line = _assert_refused(_select(truncated, out), f"{truncated} is truncated or damaged (", out)
    assert "re-create or re-download it" in line


def test_truncated_file_in_encode_split_cluster_run(truncated, good, panel, tmp_path) -> None:
    match = "is truncated or damaged"
    store = tmp_path / "o" / "s.zarr"
    _assert_refused(["encode", str(truncated), "-p", str(panel), "-o", str(store), "-q"], match, store)
    split_out = tmp_path / "o" / "split"
    _assert_refused(["split", str(truncated), "-o", str(split_out), "-q"], match, split_out)
    cluster_out = tmp_path / "o" / "cluster"
    _assert_refused(["cluster", str(truncated), "-o", str(cluster_out), "-q"], match, cluster_out)
    run_out = tmp_path / "o" / "run"
    args = ["run", "--ref", str(good), "--query", str(truncated), "-l", "cell_type", "-o", str(run_out), "-q"]
    _assert_refused(args, match, run_out / "run.json")  # run makes its (empty) folder before reading inputs


def _damage_first_chunk(path: Path, dataset: str) -> Path:
    """Overwrite the middle of the first stored chunk of ``dataset`` (a compressed stream)."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(0)
    data = bytearray(path.read_bytes())
    start = info.byte_offset + info.size // 4
    data[start : start + info.size // 2] = b"\xff" * (info.size // 2)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("parallel", [False, True], ids=["h5py", "two-core-inflate"])
def test_damaged_chunk_in_the_matrix(tmp_path, monkeypatch, parallel) -> None:
    if parallel:  # send even this small matrix through read_ranges' own inflating
        monkeypatch.setattr(hdf5_chunks, "PARALLEL_MIN_ENTRIES", 0)
        monkeypatch.setattr(hdf5_chunks, "usable_cores", lambda: 2)
        hdf5_chunks._inflate_pool.cache_clear()
    try:
        x = sp.csr_matrix(np.random.default_rng(4).poisson(2.0, size=(200, 50)).astype(np.float32))
        bad = _damage_first_chunk(_write(tmp_path / "d.h5ad", x, compression="gzip"), "X/indices")
        out = tmp_path / "o" / "panel.json"
        _assert_refused(_select(bad, out), f"{bad} is truncated or damaged (", out)
        split_out = tmp_path / "o" / "split"
        _assert_refused(["split", str(bad), "-o", str(split_out), "-q"], "is truncated or damaged", split_out)
    finally:
        hdf5_chunks._inflate_pool.cache_clear()


def test_damaged_obs_column(tmp_path) -> None:
    bad = _damage_first_chunk(_write(tmp_path / "d.h5ad", _counts(), compression="gzip"), "obs/cell_type/codes")
    out = tmp_path / "o" / "panel.json"
    _assert_refused(_select(bad, out), "is truncated or damaged", out)


# -- 2. a directory ----------------------------------------------------------------------------
def test_directory_as_input(tmp_path) -> None:
    folder = tmp_path / "data.h5ad"
    folder.mkdir()
    out = tmp_path / "o" / "panel.json"
    _assert_refused(_select(folder, out), f"{folder} is a directory, not an .h5ad file", out)


# -- 3. a missing layer ------------------------------------------------------------------------
def test_missing_layer_without_layers(good, tmp_path) -> None:
    out = tmp_path / "o" / "panel.json"
    line = _assert_refused(_select(good, out, "--layer", "counts"), f"{good} has no layer 'counts'", out)
    assert "it has no layers" in line


def test_missing_layer_lists_the_layers(tmp_path) -> None:
    x = _counts()
    ref = _write(tmp_path / "l.h5ad", x, layers={"raw": x.copy(), "binary": (x > 0).astype(np.float32)})
    out = tmp_path / "o" / "panel.json"
    line = _assert_refused(_select(ref, out, "--layer", "counts"), f"{ref} has no layer 'counts'", out)
    assert "binary, raw" in line


# -- 4. no peaks, no cells ---------------------------------------------------------------------
def test_no_peaks(tmp_path) -> None:
    ref = _write(tmp_path / "p0.h5ad", sp.csr_matrix((40, 0), dtype=np.float32))
    out = tmp_path / "o" / "panel.json"
    _assert_refused(_select(ref, out), f"{ref} has no peaks (0 columns)", out)


def test_no_cells(tmp_path) -> None:
    ref = _write(tmp_path / "c0.h5ad", sp.csr_matrix((0, 30), dtype=np.float32), labels=[])
    out = tmp_path / "o" / "panel.json"
    _assert_refused(_select(ref, out), f"{ref} has no cells", out)


# -- 5. empty-string labels are missing labels ---------------------------------------------------
def test_empty_labels_are_left_out(tmp_path) -> None:
    labels = ["a"] * 18 + [""] * 2 + ["b"] * 17 + ["  ", "\t", ""]
    ref = _write(tmp_path / "e.h5ad", _counts(), labels=labels)
    out = tmp_path / "panel.json"
    result = run_cli("select-peaks", str(ref), "-l", "cell_type", "-o", str(out), "--min-cells", "5")
    assert result.exit_code == 0, result.stderr
    assert "5 cells have no 'cell_type' label" in result.stderr
    assert sorted(Panel.load(out).cell_types) == ["a", "b"]


# -- 6. duplicate cell ids ---------------------------------------------------------------------
def test_duplicate_cell_ids(tmp_path) -> None:
    ids = [f"c{i}" for i in range(40)]
    ids[9] = ids[2]
    ref = _write(tmp_path / "dup.h5ad", _counts(), obs_names=ids)
    out = tmp_path / "o" / "panel.json"
    line = _assert_refused(_select(ref, out), f"{ref} has duplicate cell ids (e.g. 'c2')", out)
    assert "obs_names_make_unique()" in line
    split_out = tmp_path / "o" / "split"
    _assert_refused(["split", str(ref), "-o", str(split_out), "-q"], "duplicate cell ids", split_out)


# -- 7. no counts ------------------------------------------------------------------------------
def test_all_zero_matrix(tmp_path) -> None:
    ref = _write(tmp_path / "z.h5ad", sp.csr_matrix((40, 30), dtype=np.float32))
    out = tmp_path / "o" / "panel.json"
    _assert_refused(_select(ref, out), f"{ref} has no counts in any cell", out)


def test_counts_only_in_unlabelled_cells(tmp_path) -> None:
    x = np.zeros((40, 30), dtype=np.float32)
    x[-3:] = 1.0
    labels = ["a"] * 20 + ["b"] * 17 + [""] * 3
    ref = _write(tmp_path / "z.h5ad", sp.csr_matrix(x), labels=labels)
    out = tmp_path / "o" / "panel.json"
    _assert_refused(_select(ref, out), "has no counts in any labelled cell", out)


# -- 8. option values --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("option", "value"),
    [("--min-cells", "0"), ("--min-cells", "-1"), ("--n-candidates", "0"), ("--peaks-per-type", "0"),
     ("--peaks-per-type", "-1")],
)  # fmt: skip
def test_option_values_below_one(good, tmp_path, option, value) -> None:
    out = tmp_path / "o" / "panel.json"
    args = ["select-peaks", str(good), "-l", "cell_type", "-o", str(out), "-q", option, value]
    line = _assert_refused(args, f"{option} must be at least 1 (got {value})", out)
    assert f"e.g. {option} " in line


# -- 9. split ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n_cells", [0, 1])
def test_split_needs_two_cells(tmp_path, n_cells) -> None:
    data = _write(tmp_path / "one.h5ad", _counts(n_obs=n_cells), labels=["a"] * n_cells)
    out = tmp_path / "o" / "split"
    _assert_refused(["split", str(data), "-o", str(out), "-q"], f"{data} has {n_cells} cell(s); a split needs", out)


@pytest.mark.parametrize(
    ("extra", "match"),
    [(["--query-fraction", "1.5"], "is not in (0, 1)"), (["--by", "cell_type", "--query-value", "zz"], "'zz' is not"),
     (["--by", "batch"], "has a single value")],
)  # fmt: skip
def test_split_refusals_kept(tmp_path, extra, match) -> None:
    x = _counts()
    obs = pd.DataFrame({"cell_type": ["a", "b"] * 20, "batch": ["x"] * 40}, index=[f"c{i}" for i in range(40)])
    data = tmp_path / "s.h5ad"
    ad.AnnData(X=x, obs=obs).write_h5ad(data)
    out = tmp_path / "o" / "split"
    _assert_refused(["split", str(data), "-o", str(out), "-q", *extra], match, out)
