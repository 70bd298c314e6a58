"""Training: batching, split, schedule, checkpoint contents, resume, DDP, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from hitanno_cli import console
from hitanno_cli.batches import OpenRows, ShuffledCells, split_for_rank
from hitanno_cli.checkpoint import read_metadata
from hitanno_cli.sentences import SentenceStore
from hitanno_cli.training import Interrupted, TrainOptions, train
from hitanno_cli.training.data import stratified_split
from hitanno_cli.training.objective import lr_factor

TINY = {"embed_dim": 16, "level1_heads": 2, "level1_ff": 16, "level2_heads": 2, "level2_ff": 16, "head_hidden": 8}
TINY_CLI = ["--embed-dim", "16", "--heads", "2", "--ff", "16", "--head-hidden", "8", "--device", "cpu", "-q"]


# -- batching and schedule ------------------------------------------------------------------
def test_open_rows_take_and_concat_gather_the_right_rows() -> None:
    rows = OpenRows(np.array([0, 2, 2, 5]), np.array([1, 4, 0, 3, 9]))
    taken = rows.take(np.array([2, 0, 1]))
    assert taken.indptr.tolist() == [0, 3, 5, 5]
    assert taken.positions.tolist() == [0, 3, 9, 1, 4]
    both = OpenRows.concat([rows, taken])
    assert both.n == 6 and both.indptr[-1] == 10 and both.positions[5:].tolist() == [0, 3, 9, 1, 4]


@pytest.mark.parametrize("buffer_cells", [10_000, 1])  # everything cached / one chunk at a time
def test_epochs_cover_every_cell_once_in_a_seeded_order(stores: dict, buffer_cells: int) -> None:
    store = SentenceStore(stores["ref"])
    rows = np.arange(0, store.n_cells, 3)
    cells = ShuffledCells(store, rows, rows % 4, batch_size=16, buffer_cells=buffer_cells)
    epoch0 = list(cells.epoch(seed=1, epoch=0))
    seen = np.concatenate([b.rows for b in epoch0])
    assert sorted(seen.tolist()) == rows.tolist()
    assert len(epoch0) == cells.n_batches()
    assert all(np.array_equal(b.targets, b.rows % 4) for b in epoch0)
    for batch in epoch0:  # each batch, also one filled across buffer loads, holds its own rows' sentences
        expected = OpenRows.concat([store.read_open(int(r), int(r) + 1) for r in batch.rows])
        assert np.array_equal(batch.open.indptr, expected.indptr)
        assert np.array_equal(batch.open.positions, expected.positions)
    assert len(list(cells.epoch(seed=1, epoch=0, limit=2))) == 2
    again = np.concatenate([b.rows for b in cells.epoch(seed=1, epoch=0)])
    other = np.concatenate([b.rows for b in cells.epoch(seed=1, epoch=1)])
    assert np.array_equal(seen, again) and not np.array_equal(seen, other)


def test_rank_slices_are_disjoint_and_complete() -> None:
    rows = np.random.default_rng(0).permutation(101)
    parts = [split_for_rank(rows, r, 3) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(101))
    assert max(p.max() for p in parts[:2]) < parts[2].min()


def test_stratified_split_holds_out_a_quarter_of_every_class() -> None:
    targets = np.repeat([0, 1, 2], [100, 40, 2])
    train_idx, val_idx = stratified_split(targets, 0.25, seed=42)
    assert np.bincount(targets[val_idx]).tolist() == [25, 10, 1]
    assert len(np.intersect1d(train_idx, val_idx)) == 0 and len(train_idx) + len(val_idx) == len(targets)
    assert np.array_equal(val_idx, stratified_split(targets, 0.25, seed=42)[1])


def test_schedule_warms_up_then_decays_to_zero() -> None:
    factors = [lr_factor(s, 10, 3, 20) for s in range(200)]
    assert factors[0] == pytest.approx(0.1 / 3) and factors[29] == pytest.approx(1.0)
    assert factors[30] == pytest.approx(1.0) and factors[199] == pytest.approx(1 / 170)
    assert all(a <= b for a, b in zip(factors[:30], factors[1:30]))
    assert all(a >= b for a, b in zip(factors[30:], factors[31:]))


# -- the command ------------------------------------------------------------------------------
def test_train_writes_a_self_describing_checkpoint(stores: dict, tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = run_cli(
        "train",
        "-s",
        str(stores["ref"]),
        "-p",
        str(stores["panel"]),
        "-o",
        str(out),
        "--epochs",
        "2",
        "--class-weight",
        "balanced",
        "--val-fraction",
        "0.25",
        *TINY_CLI,
    )
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.jsonl",
        "model.safetensors",
        "panel.json",
        "train_config.json",
    ]
    # readable by the group like every other artifact (safetensors writes owner-only files)
    assert (out / "model.safetensors").stat().st_mode & 0o044 == (out / "panel.json").stat().st_mode & 0o044
    meta = read_metadata(out / "model.safetensors")
    header = json.loads(meta["header"])
    assert header["format"] == "hitanno.model" and header["params"]["class_weight"] == "balanced"
    assert json.loads(meta["config"])["embed_dim"] == 16
    assert json.loads(meta["class_names"]) == SentenceStore(stores["ref"]).cell_types
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2] and all("val_accuracy" in m for m in lines)
    again = run_cli("train", "-s", str(stores["ref"]), "-p", str(stores["panel"]), "-o", str(out), *TINY_CLI)
    assert again.exit_code == 2 and "already exists" in again.stderr


def _options() -> TrainOptions:
    return TrainOptions(epochs=3, batch_size=64, lr=1e-3, warmup_epochs=1, min_epochs=1, model=dict(TINY))


@pytest.mark.slow
def test_resume_after_a_signal_gives_the_uninterrupted_weights(stores: dict, tmp_path: Path) -> None:
    console.set_quiet(True)
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train(stores["ref"], panel=stores["panel"], output=straight, options=_options(), device="cpu")

    def interrupt(epoch: int, step: int) -> None:
        if epoch == 1 and step == 9:  # in the middle of the second epoch (6 steps per epoch)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        train(stores["ref"], panel=stores["panel"], output=broken, options=_options(), device="cpu", on_batch=interrupt)
    assert (broken / "resume" / "state.safetensors").is_file() and not (broken / "model.safetensors").exists()
    assert len((broken / "metrics.jsonl").read_text().splitlines()) == 1  # state at the epoch-1 boundary
    refused = run_cli("train", "-s", str(stores["ref"]), "-p", str(stores["panel"]), "-o", str(broken), *TINY_CLI)
    assert refused.exit_code == 2 and "--resume" in refused.stderr
    train(stores["ref"], panel=stores["panel"], output=broken, options=_options(), device="cpu", resume=True)
    a, b = load_file(straight / "model.safetensors"), load_file(broken / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def metrics(path: Path) -> list[dict]:
        return [
            {k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (path / "metrics.jsonl").read_text().splitlines()
        ]

    assert metrics(straight) == metrics(broken) and len(metrics(straight)) == 3
    assert not (broken / "resume").exists()


@pytest.mark.slow
def test_two_gloo_processes_train_and_write_one_checkpoint(stores: dict, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun),
        "--nproc-per-node",
        "2",
        "-m",
        "hitanno_cli",
        "train",
        "-s",
        str(stores["ref"]),
        "-p",
        str(stores["panel"]),
        "-o",
        str(out),
        "--epochs",
        "2",
        *TINY_CLI,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=240, env=env, cwd=Path(__file__).resolve().parents[1]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    header = json.loads(read_metadata(out / "model.safetensors")["header"])
    assert header["params"]["world_size"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ddp"]
    assert leftovers == []  # rank 1 wrote nothing beside it


# -- bad input ----------------------------------------------------------------------------------
def test_missing_store_is_one_line_exit_2(stores: dict, tmp_path: Path) -> None:
    result = run_cli(
        "train", "-s", str(tmp_path / "nope.zarr"), "-p", str(stores["panel"]), "-o", str(tmp_path / "m"), *TINY_CLI
    )
    assert result.exit_code == 2 and result.stderr.startswith("error:") and "does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "m").exists()


def test_store_of_another_panel_is_refused(stores: dict, small_pair: tuple[Path, Path], tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    assert (
        run_cli(
            "select-peaks", str(small_pair[0]), "-l", "cell_type", "-o", str(other), "--peaks-per-type", "30", "-q"
        ).exit_code
        == 0
    )
    result = run_cli("train", "-s", str(stores["ref"]), "-p", str(other), "-o", str(tmp_path / "m"), *TINY_CLI)
    assert result.exit_code == 2 and "another panel" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "m").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_gpu_without_cuda_is_refused(stores: dict, tmp_path: Path) -> None:
    result = run_cli(
        "train", "-s", str(stores["ref"]), "-p", str(stores["panel"]), "-o", str(tmp_path / "m"), "--gpu", "0", "-q"
    )
    assert result.exit_code == 2 and "no CUDA GPU" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_resume_without_an_interrupted_run_is_refused(stores: dict, tmp_path: Path) -> None:
    result = run_cli(
        "train", "-s", str(stores["ref"]), "-p", str(stores["panel"]), "-o", str(tmp_path / "m"), "--resume", *TINY_CLI
    )
    assert result.exit_code == 2 and "no interrupted run" in result.stderr


def test_unlabelled_store_is_refused(stores: dict, small_pair: tuple[Path, Path], tmp_path: Path) -> None:
    import anndata as ad

    data = ad.read_h5ad(small_pair[0])
    del data.obs["cell_type"]  # no label column: encode keeps no labels
    data.write_h5ad(tmp_path / "bare.h5ad")
    bare = tmp_path / "bare.zarr"
    assert (
        run_cli("encode", str(tmp_path / "bare.h5ad"), "-p", str(stores["panel"]), "-o", str(bare), "-q").exit_code == 0
    )
    result = run_cli("train", "-s", str(bare), "-p", str(stores["panel"]), "-o", str(tmp_path / "m"), *TINY_CLI)
    assert result.exit_code == 2 and "without labels" in result.stderr
    shutil.rmtree(bare)
