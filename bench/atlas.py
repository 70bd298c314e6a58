"""Atlas scale, end to end: every stage as its own ``hitanno`` process on a synthetic atlas.

For each scale (cells in reference + query, 80 % / 20 %): ``simulate`` (streamed) writes the
atlas — ``--n-peaks`` peaks, ``--n-types`` types with power-law sizes (the rarest
``--min-type-cells``), ~``open_fraction × n_peaks`` reads per cell with a log-normal depth
spread, and a donor shift between reference and query — then, as a user runs them:
``select-peaks``, ``encode`` of the reference twice (a 2-shard array and one process,
whose stores must be identical), ``encode`` of the query, ``train`` (default recipe),
``predict``, ``evaluate`` (with the report) and ``explain`` (on a sample).

Each stage's wall time, cells/s, peak resident memory (the process's ``ru_maxrss``) and
output size on disk go into one table per scale, with the query's accuracy and macro-F1;
the figures of all scales are written to ``bench/results/atlas.json``, so that the growth of
time (should be linear) and memory (should be flat) with the cells can be read off.

Usage::

    python bench/atlas.py                                   # 250 000 and 1 000 000 cells
    python bench/atlas.py --scales 20000 --n-peaks 20000 --n-types 20   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_stage(name: str, args: list[str], *, cells: int, output: Path | None, log: Path) -> dict[str, Any]:
    """Run ``hitanno ARGS`` as a child process; its wall time, peak RSS and output size."""
    started = time.perf_counter()
    with open(log, "wb") as sink:
        child = subprocess.Popen([sys.executable, "-m", "hitanno_cli", *args, "-q"], cwd=ROOT, stdout=sink, stderr=sink)
        _, status, usage = os.wait4(child.pid, 0)  # the child's own resource usage
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"hitanno {name} failed ({child.returncode}):\n{log.read_text()[-3000:]}")
    return {
        "stage": name,
        "wall_s": round(wall, 2),
        "cells_per_s": round(cells / wall, 1),
        "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),  # ru_maxrss is in KiB on Linux
        "output_mib": round(size_of(output) / 2**20, 1) if output is not None else None,
    }


def size_of(path: Path) -> int:
    """Bytes on disk of a file or a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_scale(n_cells: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every stage on an atlas of ``n_cells`` cells; the table's rows and the query's scores."""
    work = args.work / f"cells_{n_cells}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    n_query = n_cells // 5
    n_ref = n_cells - n_query
    ref, query = work / "atlas" / "reference.h5ad", work / "atlas" / "query.h5ad"
    panel, store, sharded = work / "panel.json", work / "reference.zarr", work / "reference_sharded.zarr"
    query_store, model, pred = work / "query.zarr", work / "model", work / "predictions"
    rows = []

    def stage(name: str, stage_args: list[str], cells: int, output: Path | None) -> None:
        print(f"[{n_cells}] {name} ...", file=sys.stderr, flush=True)
        log = work / (name.replace("/", "-of-").replace(" ", "_") + ".log")
        rows.append(run_stage(name, stage_args, cells=cells, output=output, log=log))
        partial = args.out.with_suffix(".partial.json")  # the stages so far, should a long run be cut short
        partial.write_text(json.dumps({"n_cells": n_cells, "stages": rows}, indent=1) + "\n")

    stage(
        "simulate",
        ["simulate", "-o", str(work / "atlas"), "--n-ref", str(n_ref), "--n-query", str(n_query),
         "--n-peaks", str(args.n_peaks), "--n-types", str(args.n_types), "--open-fraction", str(args.open_fraction),
         "--min-type-cells", str(args.min_type_cells), "--programme-share", str(args.programme_share),
         "--programme-boost", str(args.programme_boost)],
        n_cells,
        work / "atlas",
    )  # fmt: skip
    stage("select-peaks", ["select-peaks", str(ref), "-o", str(panel)], n_ref, panel)
    for shard in range(2):
        encode = ["encode", str(ref), "-p", str(panel), "-o", str(sharded), "--shard", f"{shard}/2"]
        stage(f"encode shard {shard}/2", encode, n_ref // 2, sharded if shard == 1 else None)
    stage("encode", ["encode", str(ref), "-p", str(panel), "-o", str(store)], n_ref, store)
    stage("encode query", ["encode", str(query), "-p", str(panel), "-o", str(query_store)], n_query, query_store)
    stage("train", ["train", "--sentences", str(store), "-o", str(model), *args.train_args], n_ref, model)
    rows[-1]["epoch_cells_per_s"] = epoch_throughput(model / "metrics.jsonl", n_ref)
    stage("predict", ["predict", "-m", str(model), "-s", str(query_store), "-o", str(pred)], n_query, pred)
    report = work / "report"
    truth = ["--truth", str(query_store)]
    stage("evaluate", ["evaluate", "--predictions", str(pred / "predictions.csv"), *truth, "-o", str(report)],
          n_query, report)  # fmt: skip
    explain = ["explain", "-m", str(model), "-s", str(query_store), "-o", str(work / "attention")]
    stage("explain", [*explain, "--max-cells", str(args.explain_cells)], args.explain_cells, work / "attention")
    metrics = json.loads((report / "metrics.json").read_text())
    return {
        "n_cells": n_cells,
        "n_reference": n_ref,
        "n_query": n_query,
        "stores_identical": same_store(store, sharded),
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "stages": rows,
        "total_wall_s": round(sum(r["wall_s"] for r in rows), 1),
    }


def epoch_throughput(log: Path, n_cells: int) -> float:
    """Training cells/s without start-up: the reference's cells over the median epoch's seconds."""
    seconds = sorted(json.loads(line)["seconds"] for line in log.read_text().splitlines() if line.strip())
    return round(n_cells / seconds[len(seconds) // 2], 1)


def same_store(one: Path, other: Path) -> bool:
    """Whether two sentence stores hold the same cells, labels and bits (their content hashes)."""
    from hitanno_cli.sentences import SentenceStore

    return SentenceStore(one).content_hash == SentenceStore(other).content_hash


def print_table(result: dict[str, Any]) -> None:
    print(f"\n== {result['n_cells']} cells ({result['n_reference']} reference, {result['n_query']} query)")
    print(f"{'stage':18} {'wall s':>9} {'cells/s':>10} {'peak RSS GiB':>13} {'output MiB':>11}")
    for r in result["stages"]:
        size = "-" if r["output_mib"] is None else f"{r['output_mib']:.1f}"
        print(f"{r['stage']:18} {r['wall_s']:9.1f} {r['cells_per_s']:10.0f} {r['peak_rss_gib']:13.3f} {size:>11}")
    print(
        f"total {result['total_wall_s']:.0f} s; query accuracy {result['accuracy']:.3f}, macro-F1 "
        f"{result['macro_f1']:.3f}; sharded and single-process stores identical: {result['stores_identical']}"
    )
    train = next(r for r in result["stages"] if r["stage"] == "train")
    print(f"training alone (median epoch): {train['epoch_cells_per_s']:.0f} cells/s")


def main() -> None:
    argv = sys.argv[1:]
    own, train_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", default="250000,1000000", help="comma-separated total cells")
    parser.add_argument("--n-peaks", type=int, default=200_000)
    parser.add_argument("--n-types", type=int, default=100)
    parser.add_argument("--open-fraction", type=float, default=0.0025, help="mean reads per cell / peaks")
    parser.add_argument("--min-type-cells", type=int, default=200)
    parser.add_argument("--programme-share", type=float, default=0.02, help="peaks per type programme / peaks")
    parser.add_argument("--programme-boost", type=float, default=6.0, help="how much more often they open")
    parser.add_argument("--explain-cells", type=int, default=5000)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "atlas")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "atlas.json")
    parser.add_argument("--keep", action="store_true", help="keep each scale's files (they are large)")
    args = parser.parse_args(own)
    args.train_args = train_args
    results = []
    for n_cells in (int(s) for s in args.scales.split(",")):
        results.append(run_scale(n_cells, args))
        print_table(results[-1])
        if not args.keep:
            shutil.rmtree(args.work / f"cells_{n_cells}", ignore_errors=True)
    report = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "out")},
        "cores": len(os.sched_getaffinity(0)),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
