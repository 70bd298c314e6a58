"""Flipped bytes and truncated files in every kind of artifact: each is refused with one
line and exit status 2, or gives exactly the result of the untouched artifact.

Seeded and bounded: a fixed number of cases per kind, chosen by a seeded generator over
every file of the artifact (metadata files as likely as data chunks).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from safetensors.numpy import load_file

from hitanno_cli import console
from hitanno_cli.training import Interrupted, TrainOptions, train

pytestmark = pytest.mark.slow  # about half a minute: the full suite runs it, the quick loop does not

TINY = {"embed_dim": 16, "level1_heads": 2, "level1_ff": 16, "level2_heads": 2, "level2_ff": 16, "head_hidden": 8}
TINY_CLI = ["--embed-dim", "16", "--heads", "2", "--ff", "16", "--head-hidden", "8"]
#: Cases per artifact kind: flipped bytes, then truncations.
FLIPS, CUTS = 16, 3


def _files(root: Path) -> list[Path]:
    return sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file() and p.stat().st_size)


def damage(root: Path, rng: np.random.Generator, *, case: int, truncate: bool) -> str:
    """Flip one byte of (or truncate) one file under ``root``, the files taken in turn (so
    every small metadata file is hit, not only the large chunks); say what was done."""
    files = _files(root)
    path = files[(case + int(rng.integers(len(files))) * truncate) % len(files)]
    data = bytearray(path.read_bytes())
    at = int(rng.integers(len(data)))
    if truncate:
        path.write_bytes(bytes(data[:at]))
        return f"{path.relative_to(root.parent)} cut to {at} bytes"
    data[at] ^= int(rng.integers(1, 256))
    path.write_bytes(bytes(data))
    return f"{path.relative_to(root.parent)} byte {at} flipped"


def check_case(what: str, result, same: Callable[[], bool]) -> None:  # noqa: ANN001 (click's Result)
    """Exit 2 with exactly one error line, or exit 0 with the untouched artifact's result."""
    assert result.exit_code in (0, 2), f"{what}: exit {result.exit_code}\n{result.stderr}\n{result.exception!r}"
    if result.exit_code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{what}: {result.stderr}"
    else:
        assert same(), f"{what}: accepted, with a different result"


def fuzz(
    kind: str,
    pristine: Path,
    work: Path,
    *,
    run: Callable[[Path], object],
    same: Callable[[Path], bool],
    part: str | None = None,
    flips: int = FLIPS,
) -> int:
    """Damage copies of ``pristine`` (only its ``part``, if given) in every way drawn for
    ``kind``; return how many were refused."""
    rng = np.random.default_rng(sum(map(ord, kind)))
    refused = 0
    for case in range(flips + CUTS):
        copy = work / f"{kind}-{case}" / pristine.name
        copy.parent.mkdir(parents=True)
        (shutil.copytree if pristine.is_dir() else shutil.copy2)(pristine, copy)
        what = f"{kind}: " + damage(copy / part if part else copy, rng, case=case, truncate=case >= flips)
        result = run(copy)
        check_case(what, result, lambda copy=copy: same(copy))
        refused += result.exit_code == 2
    return refused


@pytest.fixture(scope="module")
def made(stores: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A model, predictions, an evaluation and an interrupted run, all from the small stores."""
    root = tmp_path_factory.mktemp("fuzz")
    out = dict(stores, root=root, model=root / "model", pred=root / "pred", report=root / "report")
    train_args = ["train", "-s", str(stores["ref"]), "-p", str(stores["panel"]), "--epochs", "1", *TINY_CLI, "-q"]
    assert run_cli(*train_args, "-o", str(out["model"])).exit_code == 0
    assert (
        run_cli("predict", "-m", str(out["model"]), "-s", str(stores["query"]), "-o", str(out["pred"]), "-q").exit_code
        == 0
    )
    return out


def test_damaged_panel(made: dict, small_pair: tuple[Path, Path], tmp_path: Path) -> None:
    def encode(panel: Path) -> object:
        return run_cli("encode", str(small_pair[1]), "-p", str(panel), "-o", str(panel.parent / "q.zarr"), "-q")

    def store_hash(store: Path) -> str:
        return json.loads((store / "zarr.json").read_text())["attributes"]["hitanno"]["content_hash"]

    assert encode_ok(encode(made["panel"]))
    baseline = made["panel"].parent / "q.zarr"
    refused = fuzz(
        "panel",
        made["panel"],
        tmp_path,
        run=encode,
        same=lambda panel: store_hash(panel.parent / "q.zarr") == store_hash(baseline),
    )
    assert refused >= CUTS  # a truncated panel is never valid JSON


def encode_ok(result) -> bool:  # noqa: ANN001
    return result.exit_code == 0


def _predict(made: dict, out: Path, *, model: Path | None = None, store: Path | None = None) -> object:
    model, store = model or made["model"], store or made["query"]
    return run_cli("predict", "-m", str(model), "-s", str(store), "-o", str(out), "-q")


def _predictions(pred: Path) -> tuple[str, dict]:
    """What predict wrote that a damaged input could change: the table and the inputs it names."""
    attrs = json.loads((pred / "probabilities.zarr" / "zarr.json").read_text())["attributes"]["hitanno"]
    return (pred / "predictions.csv").read_text(), attrs["header"]["inputs"]


def test_damaged_sentence_store(made: dict, tmp_path: Path) -> None:
    expected = _predictions(made["pred"])
    refused = fuzz(
        "store",
        made["query"],
        tmp_path,
        run=lambda store: _predict(made, store.parent / "p", store=store),
        same=lambda store: _predictions(store.parent / "p") == expected,
        flips=32,
    )
    assert refused >= CUTS


def test_damaged_model(made: dict, tmp_path: Path) -> None:
    expected = _predictions(made["pred"])
    refused = fuzz(
        "model",
        made["model"],
        tmp_path,
        run=lambda model: _predict(made, model.parent / "p", model=model),
        same=lambda model: _predictions(model.parent / "p") == expected,
    )
    assert refused >= 1


def test_damaged_predictions(made: dict, tmp_path: Path) -> None:
    def evaluate(pred: Path) -> object:
        return run_cli(
            "evaluate",
            "--predictions",
            str(pred / "predictions.csv"),
            "--truth",
            str(made["query"]),
            "-o",
            str(pred.parent / "report"),
            "-q",
        )

    def metrics(report: Path) -> dict:
        found = json.loads((report / "metrics.json").read_text())
        return {k: v for k, v in found.items() if k not in ("header", "content_hash")}

    assert evaluate(made["pred"]).exit_code == 0
    expected = metrics(made["pred"].parent / "report")
    refused = fuzz(
        "predictions",
        made["pred"],
        tmp_path,
        run=evaluate,
        same=lambda pred: metrics(pred.parent / "report") == expected,
        flips=32,
    )
    assert refused >= 1


def test_damaged_resume_state(stores: dict, tmp_path: Path) -> None:
    console.set_quiet(True)
    model = {**TINY, "attention": "auto"}  # what the command line's options give
    options = TrainOptions(epochs=2, batch_size=64, lr=1e-3, warmup_epochs=1, min_epochs=1, model=model)
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train(stores["ref"], panel=stores["panel"], output=straight, options=options, device="cpu")

    def interrupt(epoch: int, step: int) -> None:
        if epoch == 1 and step == 8:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        train(stores["ref"], panel=stores["panel"], output=broken, options=options, device="cpu", on_batch=interrupt)
    expected = load_file(str(straight / "model.safetensors"))

    def resume(run: Path) -> object:
        return run_cli(
            "train",
            "-s",
            str(stores["ref"]),
            "-p",
            str(stores["panel"]),
            "-o",
            str(run),
            "--resume",
            "--recipe",
            "published",
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--lr",
            "1e-3",
            "--warmup-epochs",
            "1",
            "--min-epochs",
            "1",
            *TINY_CLI,
            "--device",
            "cpu",
            "-q",
        )

    def same(run: Path) -> bool:
        found = load_file(str(run / "model.safetensors"))
        return found.keys() == expected.keys() and all(np.array_equal(found[k], expected[k]) for k in expected)

    pristine = tmp_path / "pristine" / "broken"
    shutil.copytree(broken, pristine)
    first = resume(broken)
    assert first.exit_code == 0, first.stderr
    assert same(broken)  # the untouched state resumes to the uninterrupted weights
    refused = fuzz("resume", pristine, tmp_path, run=resume, same=same, part="resume")
    assert refused >= CUTS
