"""The command lines the people this is for wrote down, run exactly as written."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hitanno_cli.sentences import SentenceStore

HITANNO = str(Path(sys.executable).parent / "hitanno")


def sh(line: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run one shell line in ``cwd``, with this environment's ``hitanno`` first on the PATH."""
    env_path = f"{Path(HITANNO).parent}:/usr/bin:/bin"
    return subprocess.run(line, shell=True, cwd=cwd, capture_output=True, text=True, env={"PATH": env_path})


@pytest.mark.slow
def test_the_users_lines_run_as_written(small_pair: tuple[Path, Path], tmp_path: Path) -> None:
    shutil.copy2(small_pair[0], tmp_path / "ref.h5ad")
    shutil.copy2(small_pair[1], tmp_path / "query.h5ad")

    done = sh("hitanno select-peaks ref.h5ad", tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ref.panel.json").is_file() and "ref.panel.json" in done.stderr  # said where it went

    done = sh("hitanno encode ref.h5ad -p ref.panel.json", tmp_path)
    assert done.returncode == 0, done.stderr
    assert SentenceStore(tmp_path / "ref.zarr").labels() is not None  # the panel's label column, kept

    done = sh("hitanno train --sentences ref.zarr --gpu 0", tmp_path)
    if torch.cuda.is_available():
        assert done.returncode == 0, done.stderr
    else:  # one clear line, nothing written
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1 and "no CUDA GPU" in lines[0], done.stderr
        assert not (tmp_path / "ref.model").exists()
        done = sh("hitanno train --sentences ref.zarr", tmp_path)
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "ref.model" / "model.safetensors").is_file()

    assert sh("hitanno encode query.h5ad -p ref.panel.json", tmp_path).returncode == 0
    done = sh("hitanno predict -m ref.model -s query.zarr", tmp_path)
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "query.predictions" / "predictions.csv").read_text().splitlines()
    assert table[0].startswith("cell_id,predicted,probability") and len(table) == 1 + 250


def test_select_peaks_names_the_candidate_columns_when_it_cannot_choose(small_pair, tmp_path: Path) -> None:
    import anndata as ad

    data = ad.read_h5ad(small_pair[0])
    data.obs["labels"] = data.obs["cell_type"]  # two usual names: ambiguous
    data.write_h5ad(tmp_path / "two.h5ad")
    done = sh("hitanno select-peaks two.h5ad", tmp_path)
    assert done.returncode == 2 and "several obs columns" in done.stderr and "--label-key" in done.stderr
    del data.obs["labels"], data.obs["cell_type"]
    data.write_h5ad(tmp_path / "none.h5ad")
    done = sh("hitanno select-peaks none.h5ad", tmp_path)
    assert done.returncode == 2 and "no obs column" in done.stderr and "donor" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["none.h5ad", "two.h5ad"]
