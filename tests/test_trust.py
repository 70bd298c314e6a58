"""Artifacts are verified when read, outputs are never replaced by mistake, and every
refusal is one line with exit status 2: the cases a hostile user found."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import run_cli
from safetensors.numpy import load_file, save_file

from hitanno_cli import outputs

TINY_CLI = ["--epochs", "1", "--embed-dim", "16", "--heads", "2", "--ff", "16", "--head-hidden", "8"]


def refused(result, match: str) -> None:  # noqa: ANN001 (click's Result)
    """Exit status 2 and one line, ``error: …match…``."""
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr


@pytest.fixture(scope="module")
def model(stores: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trust") / "model"
    args = ["train", "-s", str(stores["ref"]), "-p", str(stores["panel"]), "-o", str(out), *TINY_CLI, "-q"]
    assert run_cli(*args).exit_code == 0
    return out


def _predict(model: Path, store: Path, out: Path, *extra: str):  # noqa: ANN202
    return run_cli("predict", "-m", str(model), "-s", str(store), "-o", str(out), "-q", *extra)


# -- a model is hash-checked, tensors and metadata ------------------------------------------
def _rewrite_model(model: Path, tmp_path: Path, edit) -> Path:  # noqa: ANN001
    copy = tmp_path / "m"
    shutil.copytree(model, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    from safetensors import safe_open

    with safe_open(str(copy / "model.safetensors"), framework="numpy") as handle:
        metadata = dict(handle.metadata())
    edit(tensors, metadata)
    save_file(tensors, str(copy / "model.safetensors"), metadata=metadata)
    return copy


def test_a_model_with_overwritten_tensor_bytes_is_refused(model: Path, stores: dict, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(model, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4096:] = bytes(4096)  # 4 KiB of tensor bytes zeroed
    weights.write_bytes(bytes(data))
    refused(_predict(copy, stores["query"], tmp_path / "p"), "does not match its hash")
    refused(run_cli("explain", "-m", str(copy), "-s", str(stores["query"]), "-o", str(tmp_path / "e")), "hash")


def test_swapped_class_names_and_a_flipped_bit_are_refused(model: Path, stores: dict, tmp_path: Path) -> None:
    def swap(tensors: dict, metadata: dict) -> None:
        names = json.loads(metadata["class_names"])
        metadata["class_names"] = json.dumps([names[1], names[0], *names[2:]])

    refused(_predict(_rewrite_model(model, tmp_path / "a", swap), stores["query"], tmp_path / "p"), "hash")

    def flip(tensors: dict, metadata: dict) -> None:
        name = sorted(tensors)[0]
        view = tensors[name].reshape(-1).view(np.uint8)
        view[0] ^= 1

    refused(_predict(_rewrite_model(model, tmp_path / "b", flip), stores["query"], tmp_path / "p"), "hash")


def test_inspect_of_a_pickle_named_safetensors_is_one_line(model: Path, tmp_path: Path) -> None:
    import pickle

    copy = tmp_path / "m"
    shutil.copytree(model, copy)
    (copy / "model.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    refused(run_cli("inspect", str(copy)), "safetensors")
    refused(_predict(copy, copy, tmp_path / "p"), "safetensors")


# -- a sentence store's identity -----------------------------------------------------------
def _edit_attrs(store: Path, tmp_path: Path, edit) -> Path:  # noqa: ANN001
    copy = tmp_path / "s.zarr"
    shutil.copytree(store, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    edit(meta["attributes"]["hitanno"])
    (copy / "zarr.json").write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(peaks_per_type=m["peaks_per_type"] - 1),
        lambda m: m.update(content_hash="sha256:" + "0" * 64),
        lambda m: m.update(cell_types=m["cell_types"][::-1]),
        lambda m: m["header"].update(format_version="1.0"),  # pretending to predate the hashes
    ],
    ids=["peaks_per_type", "content_hash", "cell_types", "version"],
)
def test_edited_store_attributes_are_refused(edit, model: Path, stores: dict, tmp_path: Path) -> None:  # noqa: ANN001
    copy = _edit_attrs(stores["query"], tmp_path, edit)
    refused(_predict(model, copy, tmp_path / "p"), "do not match their hash")


@pytest.mark.parametrize("array", ["cell_ids", "labels"])
def test_a_flipped_byte_in_ids_or_labels_is_refused(array: str, model: Path, stores: dict, tmp_path: Path) -> None:
    copy = tmp_path / "s.zarr"
    shutil.copytree(stores["ref"], copy)
    group = zarr.open_group(copy, mode="r+")
    values = group[array][:]
    values[3] = next(v for v in values if v != values[3])  # a duplicate id, or another label: valid strings
    group[array][:] = values
    refused(_predict(model, copy, tmp_path / "p"), f"{array} does not match its hash")
    if array == "labels":  # what training learns from (it never reads the ids)
        train = ["train", "-s", str(copy), "-p", str(stores["panel"]), "-o", str(tmp_path / "m"), *TINY_CLI]
        refused(run_cli(*train), "labels does not match its hash")


def test_a_damaged_zstd_frame_or_a_deleted_digest_array_is_one_line(model: Path, stores: dict, tmp_path: Path) -> None:
    copy = tmp_path / "s.zarr"
    shutil.copytree(stores["query"], copy)
    chunk = next(p for p in (copy / "bits").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[1] ^= 0xFF  # inside zstd's magic number
    chunk.write_bytes(bytes(data))
    refused(_predict(model, copy, tmp_path / "p"), "corrupted")
    shutil.rmtree(copy)
    shutil.copytree(stores["query"], copy)
    shutil.rmtree(copy / "bits_sha256")
    refused(_predict(model, copy, tmp_path / "p"), "corrupted")


# -- resume state --------------------------------------------------------------------------
def test_edited_resume_state_is_refused(stores: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    resume = out / "resume"
    resume.mkdir(parents=True)
    from hitanno_cli import checkpoint

    checkpoint.save_resume(out, {"model.w": __import__("torch").zeros(3)}, {"progress": {"epoch": 1}})
    state = json.loads((resume / "state.json").read_text())
    state["progress"]["epoch"] = 6
    (resume / "state.json").write_text(json.dumps(state))
    args = ["train", "-s", str(stores["ref"]), "-p", str(stores["panel"]), "-o", str(out), "--resume", *TINY_CLI]
    refused(run_cli(*args), "state.json is corrupted or was edited")
    checkpoint.save_resume(out, {"model.w": __import__("torch").zeros(3)}, {"progress": {"epoch": 1}})
    weights = resume / "state.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x01\x02\x03\x04"
    weights.write_bytes(bytes(data))
    refused(run_cli(*args), "does not match its hash")


# -- one writer at a time ------------------------------------------------------------------
def test_a_second_writer_refuses_at_once(tmp_path: Path) -> None:
    out = tmp_path / "x.zarr"
    with outputs.output_lock(out):
        with pytest.raises(Exception, match="another hitanno is writing"):
            with outputs.output_lock(out):
                pass
        with pytest.raises(Exception, match="another hitanno is writing"):
            with outputs.output_lock(out, shared=True):
                pass
    with outputs.output_lock(out, shared=True), outputs.output_lock(out, shared=True):  # the shards of one encode
        with pytest.raises(Exception, match="another hitanno is writing"):
            with outputs.output_lock(out):
                pass
    assert not outputs.lock_path(out).exists()  # nothing left behind


def test_two_encodes_into_one_output_leave_one_good_store(small_pair, small_panel, tmp_path: Path) -> None:
    out = tmp_path / "q.zarr"
    cmd = [sys.executable, "-m", "hitanno_cli", "encode", str(small_pair[0]), "-p", str(small_panel), "-o", str(out),
           "-l", "cell_type", "-q"]  # fmt: skip
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results  # one after the other (the second sees the output), or one refused
    for code, err in results:
        if code == 2:
            assert "another hitanno is writing" in err or "already exists" in err, err
    from hitanno_cli.sentences import SentenceStore

    store = SentenceStore(out)
    store.read_packed(0, store.n_cells)
    assert len(store.cell_ids()) == store.n_cells


# -- --overwrite replaces only what the command writes -------------------------------------
def test_overwrite_never_replaces_an_input(model: Path, stores: dict, small_pair, tmp_path: Path) -> None:
    store = tmp_path / "q.zarr"
    shutil.copytree(stores["query"], store)
    refused(_predict(model, store, store, "--overwrite"), "is an input of this command")
    assert (store / "zarr.json").is_file()
    reference = tmp_path / "ref.h5ad"
    shutil.copy2(small_pair[0], reference)
    refused(run_cli("select-peaks", str(reference), "-l", "cell_type", "-o", str(reference), "--overwrite"), "input")
    assert reference.stat().st_size == small_pair[0].stat().st_size


def test_overwrite_replaces_only_the_same_kind(model: Path, stores: dict, small_pair, tmp_path: Path) -> None:
    folder = tmp_path / "some_dir"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    select = ["select-peaks", str(small_pair[0]), "-l", "cell_type", "--overwrite", "-o"]
    refused(run_cli(*select, str(folder)), "not a hitanno.panel")
    assert (folder / "thesis.tex").read_text() == "years of work"
    afile = tmp_path / "afile"
    afile.write_text("mine")
    refused(_predict(model, stores["query"], afile, "--overwrite"), "not a hitanno.predictions")
    encode = ["encode", str(small_pair[1]), "-p", str(stores["panel"]), "-o", str(afile), "--overwrite"]
    refused(run_cli(*encode), "not a hitanno.sentences")
    train = ["train", "-s", str(stores["ref"]), "-p", str(stores["panel"]), "-o", str(afile), "--overwrite", *TINY_CLI]
    refused(run_cli(*train), "not a model directory")
    assert afile.read_text() == "mine"


def test_symbolic_link_outputs_are_refused(model: Path, stores: dict, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    refused(_predict(model, stores["query"], link, "--overwrite"), "symbolic link")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nothing")
    refused(_predict(model, stores["query"], dangling), "symbolic link")  # never followed, nor replaced
    assert dangling.is_symlink() and not (tmp_path / "nothing").exists()


def test_run_refuses_a_folder_it_did_not_make(small_pair, tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    (folder / "model").mkdir(parents=True)
    (folder / "panel.json").write_text("my own panel")
    (folder / "model" / "notes.txt").write_text("notes")
    args = ["run", "--ref", str(small_pair[0]), "--query", str(small_pair[1]), "-l", "cell_type", "-o", str(folder)]
    refused(run_cli(*args), "not a folder made by hitanno run")
    assert (folder / "panel.json").read_text() == "my own panel"
    assert (folder / "model" / "notes.txt").read_text() == "notes"


def test_a_damaged_run_manifest_is_refused(tmp_path: Path) -> None:
    from hitanno_cli import artifacts, pipeline

    pipeline._write_manifest(tmp_path, {"stages": {"train": {"status": "ran", "fingerprint": "sha256:1"}}})
    assert artifacts.kind_of(tmp_path / "run.json") == artifacts.RUN
    text = (tmp_path / "run.json").read_text().replace("sha256:1", "sha256:2")
    (tmp_path / "run.json").write_text(text)
    with pytest.raises(Exception, match="does not match its hash"):
        pipeline._read_manifest(tmp_path)


# -- write errors, and values and inputs that are refused --------------------------------------
def test_a_full_disk_is_one_line_and_the_old_output_survives(small_pair, small_panel, tmp_path, monkeypatch) -> None:
    from hitanno_cli import artifacts

    out = tmp_path / "panel.json"
    shutil.copy2(small_panel, out)
    before = out.read_bytes()

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(out))

    monkeypatch.setattr(artifacts, "replace_path", full)
    result = run_cli("select-peaks", str(small_pair[0]), "-l", "cell_type", "-o", str(out), "--overwrite",
                     "--peaks-per-type", "50", "-q")  # fmt: skip
    refused(result, "No space left on device")
    assert "free some disk space" in result.stderr and out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["panel.json"]  # no temporary file left


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--min-coverage", "-0.1"], "--min-coverage"),
        (["--min-coverage", "nan"], "--min-coverage"),
        (["--min-coverage", "2"], "--min-coverage 2.0 is not a share"),
        (["--shard", "0/0"], "N must be at least 1"),
    ],
)
def test_encode_refuses_values_out_of_range(extra, match, small_pair, small_panel, tmp_path) -> None:  # noqa: ANN001
    refused(
        run_cli("encode", str(small_pair[1]), "-p", str(small_panel), "-o", str(tmp_path / "q.zarr"), *extra), match
    )
    assert not any(tmp_path.iterdir())


def test_other_values_out_of_range_are_refused(model: Path, stores: dict, tmp_path: Path) -> None:
    train = ["train", "-s", str(stores["ref"]), "-p", str(stores["panel"]), "-o", str(tmp_path / "m"), *TINY_CLI]
    refused(run_cli(*train, "--buffer-cells", "0"), "--buffer-cells")
    for bad in ("0", "-4"):
        explain = ["explain", "-m", str(model), "-s", str(stores["query"]), "-o", str(tmp_path / "e")]
        refused(run_cli(*explain, "--max-cells", bad), "--max-cells")
    refused(run_cli("simulate", "-o", str(tmp_path / "s"), "--batch-peak-share", "-1"), "--batch-peak-share")
    refused(run_cli("simulate", "-o", str(tmp_path / "s"), "--open-fraction", "2"), "--open-fraction")
    assert not any(tmp_path.iterdir())


def test_evaluate_refuses_a_truncated_or_binary_table(stores: dict, tmp_path: Path) -> None:
    table = tmp_path / "predictions.csv"
    table.write_text("cell_id,predicted,probability\nquery_0,type_00_L0,0.9\nquery_1,type_0")
    evaluate = ["evaluate", "--predictions", str(table), "--truth", str(stores["query"]), "-o", str(tmp_path / "r")]
    refused(run_cli(*evaluate), "truncated")
    table.write_bytes(bytes(range(256)) * 4)
    refused(run_cli(*evaluate), "not a predictions table")


def test_evaluate_refuses_repeated_cell_ids(stores: dict, tmp_path: Path) -> None:
    table = tmp_path / "predictions.csv"
    table.write_text("cell_id,predicted,probability\nquery_0,type_00_L0,0.9\nquery_0,type_01_L1,0.8\n")
    evaluate = ["evaluate", "--predictions", str(table), "--truth", str(stores["query"]), "-o", str(tmp_path / "r")]
    refused(run_cli(*evaluate), "repeat cell id 'query_0'")


def test_ctrl_c_while_the_command_line_loads_is_one_line(tmp_path: Path) -> None:
    script = tmp_path / "slow_import.py"
    script.write_text(
        "import builtins, os, signal\n"
        "real = builtins.__import__\n"
        "def slow(name, *a, **k):\n"
        "    if name == 'hitanno_cli.cli':\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = slow\n"
        "from hitanno_cli.__main__ import main\n"
        "main()\n"
    )
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and done.stderr.strip() == "interrupted", done.stderr
    assert time.perf_counter() - started < 120


def test_lock_files_are_not_left_after_a_refusal(small_pair, tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "panel.json"
    refused(run_cli("select-peaks", str(small_pair[0]), "-l", "no_such_column", "-o", str(out)), "no_such_column")
    assert not (tmp_path / "new").exists()
    assert not any(p.name.endswith(".lock") for p in tmp_path.rglob("*"))
    assert os.listdir(tmp_path) == []
