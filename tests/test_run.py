"""``hitanno run``: the pipeline, its make-like cache, and the demo script's command path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pytest
from conftest import run_cli

TINY = [
    "--epochs",
    "2",
    "--lr",
    "1e-3",
    "--train-option",
    "embed_dim=16",
    "--train-option",
    "level1_heads=2",
    "--train-option",
    "level2_heads=2",
    "--train-option",
    "level1_ff=16",
    "--train-option",
    "level2_ff=16",
    "--train-option",
    "head_hidden=8",
    "--peaks-per-type",
    "40",
]


def _stages(out: Path) -> dict[str, str]:
    manifest = json.loads((out / "run.json").read_text())
    return {name: s["status"] for name, s in manifest["stages"].items()}


@pytest.mark.slow
def test_run_caches_stages_and_reruns_exactly_downstream(small_pair, tmp_path) -> None:
    ref, query = small_pair
    out = tmp_path / "run"
    base = ["run", "--ref", str(ref), "--query", str(query), "-l", "cell_type", "-o", str(out), "-q", *TINY]
    base.append("--no-self-train")  # the plain model first; self-training (the default) below
    result = run_cli(*base)
    assert result.exit_code == 0, result.stderr
    assert set(_stages(out).values()) == {"ran"} and len(_stages(out)) == 7
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["n_scored"] == 250 and "majority_voting" not in metrics
    annotated = ad.read_h5ad(out / "annotated.h5ad")
    assert annotated.n_obs == 250 and "hitanno_label" in annotated.obs and "X_hitanno" in annotated.obsm
    first_train = json.loads((out / "run.json").read_text())["stages"]["train"]["finished"]

    assert run_cli(*base).exit_code == 0
    assert set(_stages(out).values()) == {"cached"}
    assert json.loads((out / "run.json").read_text())["stages"]["train"]["finished"] == first_train

    assert run_cli(*base, "--min-confidence", "0.9").exit_code == 0
    assert _stages(out) == {
        "select-peaks": "cached",
        "encode-reference": "cached",
        "encode-query": "cached",
        "train": "cached",
        "predict": "ran",
        "annotate": "ran",
        "evaluate": "ran",
    }
    n_unassigned = (out / "predictions" / "predictions.csv").read_text().count(",Unassigned,")
    assert json.loads((out / "report" / "metrics.json").read_text())["unassigned"]["n"] == n_unassigned

    assert run_cli(*base, "--min-confidence", "0.9", "--train-option", "dropout=0.2").exit_code == 0
    assert [n for n, s in _stages(out).items() if s == "ran"] == ["train", "predict", "annotate", "evaluate"]

    assert (
        run_cli(*base, "--min-confidence", "0.9", "--train-option", "dropout=0.2", "--from", "encode-query").exit_code
        == 0
    )
    ran = [n for n, s in _stages(out).items() if s == "ran"]
    assert ran == ["encode-query", "train", "predict", "annotate", "evaluate"]

    # self-training on the query (the default) retrains, now downstream of the query's store too
    base.remove("--no-self-train")
    assert run_cli(*base, "--min-confidence", "0.9", "--train-option", "dropout=0.2").exit_code == 0
    assert [n for n, s in _stages(out).items() if s == "ran"] == ["train", "predict", "annotate", "evaluate"]
    assert (out / "model" / "adaptation.json").is_file()

    # majority voting is a predict setting: it reruns predict and what follows, nothing before
    voted = [*base, "--min-confidence", "0.9", "--train-option", "dropout=0.2", "--majority-voting"]
    assert run_cli(*voted).exit_code == 0
    assert [n for n, s in _stages(out).items() if s == "ran"] == ["predict", "annotate", "evaluate"]
    assert "majority_voting" in json.loads((out / "report" / "metrics.json").read_text())
    assert "hitanno_majority_voting" in ad.read_h5ad(out / "annotated.h5ad").obs
    assert run_cli(*voted, "--no-annotated-h5ad").exit_code == 0
    assert _stages(out).pop("annotate") == "skipped"  # its file is from the run before
    assert set(_stages(out).values()) - {"skipped"} == {"cached"}

    bad = run_cli(*base, "--from", "nonsense")
    assert bad.exit_code == 2 and "is not a stage" in bad.stderr
    bad = run_cli(*base, "--train-option", "wings=2")
    assert bad.exit_code == 2 and "known key" in bad.stderr


@pytest.mark.slow
def test_demo_script_runs_simulate_and_run(tmp_path) -> None:
    env = dict(
        os.environ,
        HITANNO=f"{sys.executable} -m hitanno_cli",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
        SIM_ARGS="--n-ref 400 --n-query 200 --n-peaks 500 --n-types 4 -q",
        RUN_ARGS=" ".join(TINY) + " -q",
    )
    script = Path(__file__).resolve().parents[1] / "examples" / "demo.sh"
    proc = subprocess.run(
        ["bash", str(script), str(tmp_path / "demo")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "demo" / "run" / "report" / "report.html").exists()
    assert "report:" in proc.stdout


def test_split_by_column_and_at_random(small_pair, tmp_path) -> None:
    import anndata as ad

    ref, _ = small_pair
    result = run_cli("split", str(ref), "-o", str(tmp_path / "s"), "-l", "cell_type", "--query-fraction", "0.2", "-q")
    assert result.exit_code == 0, result.stderr
    a, b = ad.read_h5ad(tmp_path / "s" / "reference.h5ad"), ad.read_h5ad(tmp_path / "s" / "query.h5ad")
    assert a.n_obs + b.n_obs == 500 and b.n_obs == 100 and not set(a.obs_names) & set(b.obs_names)
    assert set(b.obs["cell_type"]) == set(a.obs["cell_type"])  # stratified: every type on both sides
    result = run_cli("split", str(ref), "-o", str(tmp_path / "d"), "--by", "cell_type", "-q")
    assert result.exit_code == 0
    q = ad.read_h5ad(tmp_path / "d" / "query.h5ad")
    assert q.obs["cell_type"].nunique() == 1
    assert run_cli("split", str(ref), "-o", str(tmp_path / "e"), "--by", "donr").exit_code == 2


def test_run_finds_the_label_column_or_refuses_before_writing(small_pair, tmp_path, monkeypatch) -> None:
    """Without ``-l`` the reference's one usual cell-type column is used, as in select-peaks;
    with two candidates the run is refused in one line and leaves no folder."""
    import hitanno_cli.pipeline as pipeline

    ref, query = small_pair
    seen: list[str] = []

    def planned(ref_path, query_path, label_key, out, settings):  # stop before any stage runs
        seen.append(label_key)
        raise SystemExit(0)

    monkeypatch.setattr(pipeline, "plan", planned)
    with pytest.raises(SystemExit):
        pipeline.run(ref, query=query, output=tmp_path / "found")
    assert seen == ["cell_type"]
    two = tmp_path / "two.h5ad"
    adata = ad.read_h5ad(ref)
    adata.obs["celltype"] = adata.obs["cell_type"]
    adata.write_h5ad(two)
    result = run_cli("run", "--ref", str(two), "--query", str(query), "-o", str(tmp_path / "refused"), "-q")
    assert result.exit_code == 2 and "--label-key" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()
