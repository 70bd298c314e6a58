"""Every bad input gets one line naming problem and fix, exit status 2, and no artifact."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from conftest import run_cli

from hitanno_cli.errors import UserError
from hitanno_cli.sentences import SentenceStore, encode


def _write(path: Path, x, names=None, labels=None) -> Path:
    n_obs, n_vars = x.shape
    names = names or [f"chr1:{i * 1000}-{i * 1000 + 500}" for i in range(n_vars)]
    labels = labels if labels is not None else np.repeat(["a", "b"], [n_obs // 2, n_obs - n_obs // 2])
    obs = pd.DataFrame({"cell_type": labels}, index=[f"c{i}" for i in range(n_obs)])
    ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=names)).write_h5ad(path)
    return path


def _assert_refused(args: list[str], match: str, out: Path) -> None:
    before = sorted(out.parent.iterdir()) if out.parent.exists() else []
    result = run_cli(*args)
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # one line, last
    assert match in errors[0], errors[0]
    after = sorted(out.parent.iterdir()) if out.parent.exists() else []
    assert after == before, "an artifact or temporary file was left behind"


def _counts(rng, n_obs=40, n_vars=30) -> sp.csr_matrix:
    return sp.csr_matrix(rng.poisson(0.5, size=(n_obs, n_vars)).astype(np.float32))


@pytest.fixture()
def good(tmp_path) -> Path:
    return _write(tmp_path / "good.h5ad", _counts(np.random.default_rng(0)))


def _select(ref: Path, out: Path, *extra: str) -> list[str]:
    return [
        "select-peaks",
        str(ref),
        "-l",
        "cell_type",
        "-o",
        str(out),
        "--min-cells",
        "5",
        "--peaks-per-type",
        "5",
        "-q",
        *extra,
    ]


def test_missing_file(tmp_path) -> None:
    out = tmp_path / "o" / "panel.json"
    _assert_refused(_select(tmp_path / "nope.h5ad", out), "does not exist", out)


def test_not_an_h5ad(tmp_path) -> None:
    bad = tmp_path / "x.h5ad"
    bad.write_text("cell,peak\n")
    out = tmp_path / "o" / "panel.json"
    _assert_refused(_select(bad, out), "not an .h5ad", out)


def test_label_key_missing(good, tmp_path) -> None:
    out = tmp_path / "o" / "panel.json"
    args = _select(good, out)
    args[args.index("cell_type")] = "celltype"
    _assert_refused(args, "label key 'celltype'", out)


def test_type_below_min_cells_is_named(tmp_path) -> None:
    labels = ["a"] * 30 + ["b"] * 7 + ["rare"] * 3
    ref = _write(tmp_path / "r.h5ad", _counts(np.random.default_rng(1)), labels=labels)
    out = tmp_path / "o" / "panel.json"
    args = _select(ref, out)
    args[args.index("--min-cells") + 1] = "8"
    _assert_refused(args, "b (7), rare (3)", out)


@pytest.mark.parametrize(
    ("value", "match"), [(-1.0, "negative counts"), (np.nan, "NaN"), (0.5, "non-integer values such as 0.5")]
)
def test_bad_counts_in_select_and_encode(tmp_path, good, value, match) -> None:
    x = _counts(np.random.default_rng(2)).toarray()
    x[37, 4] = value
    bad = _write(tmp_path / "bad.h5ad", sp.csr_matrix(x))
    out = tmp_path / "o" / "panel.json"
    _assert_refused(_select(bad, out), match, out)
    panel = tmp_path / "panel.json"
    assert run_cli(*_select(good, panel)).exit_code == 0
    store = tmp_path / "o" / "s.zarr"
    _assert_refused(["encode", str(bad), "-p", str(panel), "-o", str(store), "-q"], match, store)


def test_duplicate_peak_names(tmp_path) -> None:
    names = [f"chr1:{i * 1000}-{i * 1000 + 500}" for i in range(30)]
    names[7] = names[3]
    ref = _write(tmp_path / "d.h5ad", _counts(np.random.default_rng(3)), names=names)
    out = tmp_path / "o" / "panel.json"
    _assert_refused(_select(ref, out), "duplicate peak names", out)


def test_zero_overlap_between_query_and_panel(tmp_path, good) -> None:
    panel = tmp_path / "panel.json"
    assert run_cli(*_select(good, panel)).exit_code == 0
    other = _write(
        tmp_path / "q.h5ad",
        _counts(np.random.default_rng(4)),
        names=[f"chr9:{i * 1000}-{i * 1000 + 500}" for i in range(30)],
    )
    out = tmp_path / "o" / "q.zarr"
    _assert_refused(["encode", str(other), "-p", str(panel), "-o", str(out)], "only 0 of 10 panel peaks", out)


def test_newer_or_corrupted_panel(tmp_path, good) -> None:
    panel = tmp_path / "panel.json"
    assert run_cli(*_select(good, panel)).exit_code == 0
    obj = json.loads(panel.read_text())
    newer = tmp_path / "newer.json"
    obj["header"]["format_version"] = "2.0"
    newer.write_text(json.dumps(obj))
    out = tmp_path / "o" / "s.zarr"
    _assert_refused(["encode", str(good), "-p", str(newer), "-o", str(out)], "upgrade hitanno", out)
    obj = json.loads(panel.read_text())
    obj["panel"]["cell_types"][0]["peaks"]["name"][0] = obj["panel"]["cell_types"][1]["peaks"]["name"][0]
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(obj))
    _assert_refused(["encode", str(good), "-p", str(edited), "-o", str(out)], "does not match its hash", out)


def test_newer_store_version_is_refused(tmp_path, good) -> None:
    panel = tmp_path / "panel.json"
    assert run_cli(*_select(good, panel)).exit_code == 0
    store = tmp_path / "s.zarr"
    encode(good, panel=panel, output=store)
    group = zarr.open_group(store, mode="a")
    meta = dict(group.attrs)["hitanno"]
    meta["header"]["format_version"] = "9.0"
    group.attrs["hitanno"] = meta
    with pytest.raises(UserError, match="newer than this hitanno"):
        SentenceStore(store)


def test_output_exists_without_overwrite(tmp_path, good) -> None:
    panel = tmp_path / "panel.json"
    panel.write_text("precious")
    _assert_refused(_select(good, panel), "--overwrite", panel)
    assert panel.read_text() == "precious"
    _assert_refused(_select(good, panel, "--overwrite"), "replaces only a hitanno.panel", panel)  # not a panel
    assert panel.read_text() == "precious"
    panel.unlink()
    assert run_cli(*_select(good, panel)).exit_code == 0
    assert run_cli(*_select(good, panel, "--overwrite")).exit_code == 0  # a panel: replaced
    store = tmp_path / "s.zarr"
    store.mkdir()
    (store / "mine.txt").write_text("keep")
    _assert_refused(["encode", str(good), "-p", str(panel), "-o", str(store)], "--overwrite", store)
    _assert_refused(["encode", str(good), "-p", str(panel), "-o", str(store), "--overwrite"], "replaces only", store)
    assert (store / "mine.txt").read_text() == "keep"
