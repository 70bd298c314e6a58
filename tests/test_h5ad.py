"""Streaming reads of ``.h5ad`` count matrices (hitanno_cli.h5ad)."""

from __future__ import annotations

import zlib

import h5py
import numpy as np
import pytest

from hitanno_cli import hdf5_chunks


def _compressed(path, n: int, chunk: int, **filters) -> None:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.create_dataset("ints", data=rng.integers(0, 50_000, n, dtype=np.int32), chunks=(chunk,), **filters)
        f.create_dataset("floats", data=rng.poisson(1.5, n).astype(np.float32), chunks=(chunk,), **filters)


@pytest.mark.parametrize("inflate", [hdf5_chunks.inflate, zlib.decompress], ids=["default", "zlib"])
@pytest.mark.parametrize("a,b", [(0, 300_000), (1_234, 299_999), (4_999, 5_001), (17, 250_017)])
def test_parallel_inflate_equals_h5py(tmp_path, monkeypatch, a: int, b: int, inflate) -> None:
    """Raw gzip chunks inflated in two threads give h5py's values for any range, aligned or not
    (with ISA-L's inflate and with zlib's, the fallback where isal is missing)."""
    _compressed(tmp_path / "x.h5", 300_000, 5_000, compression="gzip")
    monkeypatch.setattr(hdf5_chunks, "inflate", inflate)
    monkeypatch.setattr(hdf5_chunks, "PARALLEL_MIN_ENTRIES", 1)
    monkeypatch.setattr(hdf5_chunks, "_inflate_pool", lambda: hdf5_chunks.ThreadPoolExecutor(max_workers=2))
    with h5py.File(tmp_path / "x.h5", "r") as f:
        assert hdf5_chunks._deflate_only(f["ints"])
        got = hdf5_chunks.read_ranges([f["ints"], f["floats"]], a, b)
        for name, values in zip(("ints", "floats"), got):
            assert values.dtype == f[name].dtype
            np.testing.assert_array_equal(values, f[name][a:b])


@pytest.mark.parametrize("filters", [{}, {"compression": "gzip", "shuffle": True}, {"compression": "lzf"}])
def test_other_layouts_fall_back_to_h5py(tmp_path, monkeypatch, filters: dict) -> None:
    """Uncompressed, shuffled or non-gzip datasets are not inflated by hand, and read the same."""
    _compressed(tmp_path / "x.h5", 50_000, 4_096, **filters)
    monkeypatch.setattr(hdf5_chunks, "PARALLEL_MIN_ENTRIES", 1)
    with h5py.File(tmp_path / "x.h5", "r") as f:
        assert not hdf5_chunks._deflate_only(f["ints"])
        got = hdf5_chunks.read_ranges([f["ints"], f["floats"]], 100, 40_000)
        np.testing.assert_array_equal(got[0], f["ints"][100:40_000])
        np.testing.assert_array_equal(got[1], f["floats"][100:40_000])


def test_a_chunk_never_written_falls_back_to_h5py(tmp_path, monkeypatch) -> None:
    """A chunk HDF5 never allocated (it reads as the fill value) has no raw bytes to inflate."""
    monkeypatch.setattr(hdf5_chunks, "PARALLEL_MIN_ENTRIES", 1)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        d = f.create_dataset("x", shape=(10_000,), dtype="i4", chunks=(1_000,), compression="gzip", fillvalue=7)
        d[:3_000] = np.arange(3_000)
    with h5py.File(tmp_path / "x.h5", "r") as f:
        np.testing.assert_array_equal(hdf5_chunks.read_ranges([f["x"]], 500, 9_000)[0], f["x"][500:9_000])
