"""Artifact headers, version checks and atomic writes."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from hitanno_cli import __version__, artifacts
from hitanno_cli.errors import UserError


def test_header_round_trip_records_version_params_inputs() -> None:
    header = artifacts.make_header(artifacts.PANEL, {"a": 1}, {"reference": "sha256:x"})
    assert header["format"] == artifacts.PANEL
    assert header["hitanno_version"] == __version__
    assert header["params"] == {"a": 1} and header["inputs"] == {"reference": "sha256:x"}
    assert artifacts.check_header(header, artifacts.PANEL, "p") is header


def test_newer_major_version_is_refused_but_newer_minor_is_read() -> None:
    header = artifacts.make_header(artifacts.PANEL, {}, {})
    header["format_version"] = "1.7"
    artifacts.check_header(header, artifacts.PANEL, "p")
    header["format_version"] = "2.0"
    with pytest.raises(UserError, match="newer than this hitanno"):
        artifacts.check_header(header, artifacts.PANEL, "p")


def test_wrong_or_missing_format_is_refused() -> None:
    with pytest.raises(UserError, match="not a hitanno artifact"):
        artifacts.check_header({"x": 1}, artifacts.PANEL, "p")
    header = artifacts.make_header(artifacts.SENTENCES, {}, {})
    with pytest.raises(UserError, match="not 'hitanno.panel'"):
        artifacts.check_header(header, artifacts.PANEL, "p")


def test_atomic_dir_leaves_nothing_on_failure_and_keeps_old_output(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with artifacts.atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "keep.txt").read_text() == "old"


def test_atomic_writes_refuse_existing_without_overwrite(tmp_path) -> None:
    path = tmp_path / "a.json"
    artifacts.write_json(path, {"v": 1})
    with pytest.raises(UserError, match="--overwrite"):
        artifacts.write_json(path, {"v": 2})
    artifacts.write_json(path, {"v": 2}, overwrite=True)
    assert artifacts.read_json(path, "x") == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_content_hashes_are_stable_and_sensitive(tmp_path) -> None:
    assert artifacts.sha256_json({"a": 1, "b": 2}) == artifacts.sha256_json({"b": 2, "a": 1})
    assert artifacts.sha256_json({"a": 1}) != artifacts.sha256_json({"a": 2})
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    assert artifacts.sha256_file(f) == ("sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    cancelled = threading.Event()
    cancelled.set()
    assert artifacts.sha256_file(f, cancelled) == ""  # a background hash abandoned after an error


def test_atomic_outputs_get_ordinary_permissions(tmp_path) -> None:
    import os

    mask = os.umask(0o022)
    try:
        artifacts.write_json(tmp_path / "a.json", {})
        with artifacts.atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_sha256_lines_hashes_one_string_per_line() -> None:
    import hashlib

    items = [f"cell_{i}" for i in range(70_000)] + [3, "é"]  # spans more than one block
    expected = hashlib.sha256("".join(f"{x}\n" for x in items).encode()).hexdigest()
    assert artifacts.sha256_lines(items) == "sha256:" + expected
    assert artifacts.sha256_lines([]) == "sha256:" + hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("n", [0, 5, artifacts.STRING_CHUNK + 3])
def test_write_strings_round_trips_in_chunks_no_longer_than_the_array(tmp_path, n: int) -> None:
    """A short string array is one chunk of its own length; a long one uses full chunks."""
    import zarr

    values = np.array([f"cell-{i}-é" for i in range(n)], dtype=str)
    group = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=3)
    artifacts.write_strings(group, "ids", values)
    array = zarr.open_group(tmp_path / "s.zarr", mode="r")["ids"]
    assert array.chunks == (max(1, min(n, artifacts.STRING_CHUNK)),)
    assert array[:].tolist() == values.tolist()


def test_background_hash_gives_the_file_hash_and_stops_on_an_error(tmp_path, monkeypatch) -> None:
    """The hash computed in the background equals sha256_file's; leaving the block by an
    error signals it to stop (sha256_file then returns "" at its next block, tested above)."""
    f = tmp_path / "big.bin"
    f.write_bytes(np.random.default_rng(0).bytes(3 << 20))
    with artifacts.sha256_file_in_background(f) as digest:
        assert digest.result() == artifacts.sha256_file(f)

    def waits_for_cancel(path, cancel):
        return "" if cancel.wait(10) else "finished"

    monkeypatch.setattr(artifacts, "sha256_file", waits_for_cancel)
    with pytest.raises(RuntimeError), artifacts.sha256_file_in_background(f) as digest:
        raise RuntimeError("the caller's work failed")
    assert digest.result() == ""  # told to stop, not left to finish
