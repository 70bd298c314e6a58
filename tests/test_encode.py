"""Cell sentences: exact states, overlap matching, sharding and corruption checks."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from conftest import run_cli

from hitanno_cli import artifacts
from hitanno_cli.errors import UserError
from hitanno_cli.panel import Panel
from hitanno_cli.sentences import SentenceStore, encode


def _expected_states(h5ad_path: Path, panel: Panel) -> np.ndarray:
    """Sentences computed directly: dense counts, panel columns by name."""
    adata = ad.read_h5ad(h5ad_path)
    column = {n: i for i, n in enumerate(adata.var_names)}
    idx = [column[n] for n in panel.flat_names()]
    dense = adata.X.toarray()[:, idx] > 0
    return dense.reshape(adata.n_obs, panel.n_types, panel.peaks_per_type)


def test_encode_matches_direct_computation_and_keeps_labels(small_pair, small_panel, tmp_path) -> None:
    ref, query = small_pair
    out = tmp_path / "q.zarr"
    result = run_cli("encode", str(query), "-p", str(small_panel), "-o", str(out), "-l", "cell_type")
    assert result.exit_code == 0, result.stderr
    panel = Panel.load(small_panel)
    store = SentenceStore(out)
    assert store.n_cells == 250 and store.cell_types == panel.cell_types
    assert store.panel_hash == panel.content_hash
    np.testing.assert_array_equal(store.read_dense(0, store.n_cells), _expected_states(query, panel))
    adata = ad.read_h5ad(query)
    assert store.labels().tolist() == adata.obs["cell_type"].astype(str).tolist()
    assert store.cell_ids().tolist() == adata.obs_names.tolist()
    cells = store.read_open(10, 30)
    indptr, positions = cells.indptr, cells.positions
    dense = store.read_dense(10, 30).reshape(20, -1)
    assert indptr[-1] == dense.sum() and set(positions[indptr[3] : indptr[4]]) == set(np.flatnonzero(dense[3]))
    assert store.meta["coverage"]["found"] == panel.size
    # the input's hash, computed in a background thread while encoding, is the file's
    assert store.meta["header"]["inputs"]["data"] == artifacts.sha256_file(query)


def test_store_keeps_its_panel_as_bytes_and_reads_older_string_arrays(small_pair, small_panel, tmp_path) -> None:
    """The panel text is kept as UTF-8 bytes (a one-element string array of a large text
    cost zarr gigabytes to write); a store holding it the older way still reads."""
    import zarr

    from hitanno_cli.sentences.store import read_text

    out = tmp_path / "q.zarr"
    assert run_cli("encode", str(small_pair[1]), "-p", str(small_panel), "-o", str(out), "-q").exit_code == 0
    store = SentenceStore(out)
    text = small_panel.read_text(encoding="utf-8")
    assert zarr.open_group(out, mode="r")["panel"].dtype == np.uint8
    assert store.panel_text() == text and store.panel().content_hash == Panel.load(small_panel).content_hash
    older = zarr.open_group(tmp_path / "older.zarr", mode="w")
    artifacts.write_strings(older, "panel", np.array([text + " é"], dtype=object).astype(str))
    assert read_text(older["panel"]) == text + " é"


def test_query_with_other_peak_names_is_matched_by_overlap(small_pair, small_panel, tmp_path) -> None:
    ref, query = small_pair
    adata = ad.read_h5ad(query)
    # same peaks, shifted by 50 bp and renamed chr_start_end, with no var coordinates
    shifted = [f"{c}_{s + 50}_{e + 50}" for c, s, e in zip(adata.var["chrom"], adata.var["start"], adata.var["end"])]
    renamed = ad.AnnData(X=adata.X, obs=adata.obs, var=adata.var.iloc[:, :0].set_axis(shifted))
    renamed_path = tmp_path / "renamed.h5ad"
    renamed.write_h5ad(renamed_path)
    encode(query, panel=small_panel, output=tmp_path / "a.zarr")
    encode(renamed_path, panel=small_panel, output=tmp_path / "b.zarr")
    a, b = SentenceStore(tmp_path / "a.zarr"), SentenceStore(tmp_path / "b.zarr")
    np.testing.assert_array_equal(a.read_dense(0, a.n_cells), b.read_dense(0, b.n_cells))
    assert b.meta["coverage"]["by_overlap"] == Panel.load(small_panel).size
    assert b.meta["labels"]["key"] == "cell_type"  # without -l: the panel's label column, found in the data


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_sharded_encode_is_byte_identical_to_single_process(small_pair, small_panel, tmp_path, monkeypatch) -> None:
    import hitanno_cli.sentences as sentences

    monkeypatch.setattr(sentences.store, "CHUNK_BYTES", 64 * 25)  # 256-cell chunks: several per shard
    ref, _ = small_pair
    single = tmp_path / "single.zarr"
    encode(ref, panel=small_panel, output=single, label_key="cell_type")
    sharded = tmp_path / "sharded.zarr"
    returned = [
        encode(ref, panel=small_panel, output=sharded, label_key="cell_type", shard=f"{i}/3") for i in (2, 0, 1)
    ]
    assert returned == [None, None, sharded]  # the last shard to finish assembles the store
    assert _tree(single) == _tree(sharded)
    for name in _tree(single):
        if name != "zarr.json":
            assert filecmp.cmp(single / name, sharded / name, shallow=False), name
    meta = [json.loads((p / "zarr.json").read_text())["attributes"]["hitanno"] for p in (single, sharded)]
    from hitanno_cli import artifacts

    for m in meta:
        assert artifacts.seal_holds(m, "meta_hash")
        m["header"].pop("created")
        m.pop("meta_hash")  # it covers the creation time, which differs when the two runs straddle a second
    assert meta[0] == meta[1]
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_concurrent_shard_processes_build_one_store(small_pair, small_panel, tmp_path) -> None:
    ref, _ = small_pair
    out = tmp_path / "conc.zarr"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hitanno_cli",
                "encode",
                str(ref),
                "-p",
                str(small_panel),
                "-o",
                str(out),
                "--shard",
                f"{i}/4",
                "-q",
            ],
            env=env,
            stderr=subprocess.PIPE,
        )
        for i in range(4)
    ]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    encode(ref, panel=small_panel, output=tmp_path / "one.zarr")
    a, b = SentenceStore(out), SentenceStore(tmp_path / "one.zarr")
    assert a.content_hash == b.content_hash


def test_corrupted_chunk_is_detected(small_pair, small_panel, tmp_path) -> None:
    out = tmp_path / "s.zarr"
    encode(small_pair[1], panel=small_panel, output=out)
    store = SentenceStore(out)
    digests = store._group["bits_sha256"]
    bad = digests[:]
    bad[0, 0] ^= 0xFF
    import zarr

    zarr.open_group(out, mode="a")["bits_sha256"][:] = bad
    with pytest.raises(UserError, match="corrupted"):
        SentenceStore(out).read_dense(0, 10)


def test_store_panel_mismatch_is_refused(small_pair, small_panel, tmp_path) -> None:
    out = tmp_path / "s.zarr"
    encode(small_pair[1], panel=small_panel, output=out)
    with pytest.raises(UserError, match="another panel"):
        SentenceStore(out).check_panel("sha256:0000")


def test_pack_states_many_to_many_map_and_explicit_zeros() -> None:
    import scipy.sparse as sp

    from hitanno_cli.sentences import PeakMatch, pack_states

    # column 0 lights panel peaks 1 and 2 (a wide merged peak); columns 1 and 2 both light 0
    match = PeakMatch.from_pairs(
        np.array([0, 0, 1, 2]), np.array([1, 2, 0, 0]), n_columns=4, n_panel=10, by_name=0, by_overlap=3
    )
    assert match.lookup is None
    counts = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 2, 3, 0], [0, 0, 0, 5]], dtype=np.float32))
    counts.data[counts.data == 3] = 0  # an explicitly stored zero
    stored = [counts.data.copy(), counts.indices.copy(), counts.indptr.copy()]
    bits = np.unpackbits(pack_states(counts, match, 2), axis=1, count=10, bitorder="little")
    for before, now in zip(stored, [counts.data, counts.indices, counts.indptr]):
        np.testing.assert_array_equal(now, before)  # dropping the zero leaves the caller's matrix alone
    assert bits[0].tolist() == [0, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert bits[1].tolist() == [1] + [0] * 9
    assert bits[2].sum() == 0
    one_to_one = PeakMatch.from_pairs(
        np.array([3, 1]), np.array([9, 4]), n_columns=4, n_panel=10, by_name=2, by_overlap=0
    )
    bits = np.unpackbits(pack_states(counts, one_to_one, 2), axis=1, count=10, bitorder="little")
    assert np.flatnonzero(bits[1]).tolist() == [4] and np.flatnonzero(bits[2]).tolist() == [9]
    zero_in_panel = PeakMatch.from_pairs(
        np.array([2, 1]), np.array([9, 4]), n_columns=4, n_panel=10, by_name=2, by_overlap=0
    )
    bits = np.unpackbits(pack_states(counts, zero_in_panel, 2), axis=1, count=10, bitorder="little")
    assert np.flatnonzero(bits[1]).tolist() == [4]  # column 2's stored zero lights nothing


def test_pack_states_across_scratch_blocks_equals_dense(monkeypatch) -> None:
    """Rows packed block by block through the reused scratch equal a dense computation."""
    import scipy.sparse as sp

    from hitanno_cli import sentences

    rng = np.random.default_rng(3)
    counts = sp.random(37, 50, density=0.2, format="csr", random_state=4, dtype=np.float32)
    counts.data = np.ceil(counts.data * 3)
    lookup = rng.permutation(50)[:30]  # columns 0..29 light distinct panel peaks
    match = sentences.PeakMatch.from_pairs(np.arange(30), lookup, n_columns=50, n_panel=50, by_name=30, by_overlap=0)
    monkeypatch.setattr(sentences.packing, "SCRATCH_BITS", 7 * 56)  # 7 rows per block: 6 blocks
    packed = sentences.pack_states(counts, match, 7)
    expected = np.zeros((37, 56), dtype=bool)
    dense = counts.toarray() > 0
    expected[:, lookup] = dense[:, :30]
    assert np.array_equal(np.unpackbits(packed, axis=1, bitorder="little").astype(bool), expected)
    every = rng.permutation(50)  # every column lights one panel peak: renumbered, not sliced
    match = sentences.PeakMatch.from_pairs(np.arange(50), every, n_columns=50, n_panel=50, by_name=50, by_overlap=0)
    assert match.maps_every_column
    expected = np.zeros((37, 56), dtype=bool)
    expected[:, every] = dense
    packed = sentences.pack_states(counts, match, 7)
    assert np.array_equal(np.unpackbits(packed, axis=1, bitorder="little").astype(bool), expected)


def test_background_writer_writes_rows_and_surfaces_errors(tmp_path) -> None:
    import zarr

    from hitanno_cli.sentences import BackgroundWriter

    array = zarr.create_array(tmp_path / "a.zarr", shape=(10, 3), chunks=(4, 3), dtype="uint8", fill_value=0)
    with BackgroundWriter(array) as writer:
        writer.write(0, np.full((4, 3), 1, np.uint8))
        writer.write(4, np.full((6, 3), 2, np.uint8))
    assert array[:].tolist() == [[1] * 3] * 4 + [[2] * 3] * 6

    class Failing(BackgroundWriter):
        def _put(self, start: int, block: np.ndarray) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):  # raised in the thread, surfaced here
        with Failing(array) as writer:
            writer.write(0, np.ones((2, 3), np.uint8))


@pytest.mark.parametrize("n_positions", [1, 7, 8, 13, 1001])
def test_unpack_open_equals_unpacking_every_bit(n_positions: int) -> None:
    """Open positions from the non-zero bytes alone are those of a full unpacking, in order,
    at every density, with a stray padding bit past the panel ignored."""
    from hitanno_cli.sentences.packing import unpack_open

    rng = np.random.default_rng(n_positions)
    for density in (0.0, 0.01, 0.5, 1.0):
        states = rng.random((6, n_positions)) < density
        packed = np.packbits(states, axis=1, bitorder="little")
        if n_positions % 8:
            packed[:, -1] |= 0x80
        got = unpack_open(packed, n_positions)
        rows, positions = np.nonzero(states)
        assert got.positions.dtype == np.int64 and np.array_equal(got.positions, positions)
        assert np.array_equal(got.indptr, np.concatenate([[0], np.cumsum(states.sum(axis=1))]))
