"""Benchmark of ``select-peaks`` + ``encode`` (issue: part 1).

1. Granja (real data): hitanno against the published preprocessing written plainly in
   ``bench/reference_preprocess.py``, each in its own process, same run: wall time, peak
   RSS and the speed-up, in ``--rounds`` interleaved rounds (the ratio is taken within a
   round, the median reported: this shared machine's speed drifts over minutes).
2. Synthetic atlas: a generated sparse h5ad (default 200 000 cells × 100 000 peaks,
   about 1 000 open peaks per cell, 30 types with power-law sizes), at two sizes to show
   that peak RSS does not grow with the number of cells; select-peaks and encode
   throughput (cells/s) with encode pinned to one core.

    .venv/bin/python bench/preprocess.py [--rounds 3] [--cells 200000] [--peaks 100000] [--skip-reference]

Prints a table and writes ``bench/results/preprocess.json``.
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

import h5py
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
GRANJA = ROOT.parent / "shared" / "data" / "granja2019_bmmc_atac.h5ad"
WORK = ROOT / "bench" / "_work"
RESULTS = ROOT / "bench" / "results"

# -- measuring a stage in its own process ------------------------------------------------
_RUNNER = """
import json, resource, sys, time
t0 = time.perf_counter()
from hitanno_cli import console
from hitanno_cli.selection import select_peaks
from hitanno_cli.sentences import encode
console.set_quiet(True)
t1 = time.perf_counter()
stage, args = sys.argv[1], sys.argv[2:]
if stage == "select":
    select_peaks(args[0], label_key=args[1]).save(args[2], overwrite=True)
else:
    encode(args[0], panel=args[1], output=args[2], label_key=args[3], overwrite=True)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "work_s": t2 - t1,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _run(cmd: list[str], one_core: bool = False) -> dict:
    """Run a measuring subprocess; return its JSON report plus the wall time seen outside."""
    env = dict(os.environ)
    if one_core:
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        if shutil.which("taskset"):
            cmd = ["taskset", "-c", "0", *cmd]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step failed: {' '.join(cmd)}\n{proc.stderr}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["wall_s"] = wall
    return report


def hitanno_stage(stage: str, *args: str, one_core: bool = False) -> dict:
    return _run([sys.executable, "-c", _RUNNER, stage, *map(str, args)], one_core)


def _median_report(runs: list[dict]) -> dict:
    """Median of each timing over repeated runs (the machine is shared), the largest RSS."""
    out = {key: float(np.median([r[key] for r in runs])) for key in runs[0] if key != "peak_rss_mib"}
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    out["repeats"] = len(runs)
    out["work_s_all"] = [r["work_s"] for r in runs]
    return out


def hitanno_pipeline(data: Path, label_key: str, work: Path, one_core_encode: bool, repeats: int = 1) -> dict:
    """select-peaks then encode, each measured in its own process, ``repeats`` times (medians)."""
    panel, store = work / "panel.json", work / "sentences.zarr"
    select, enc = [], []
    for _ in range(repeats):
        for previous in (panel, store):  # a fresh output each time: removing the old one is not the work
            shutil.rmtree(previous) if previous.is_dir() else previous.unlink(missing_ok=True)
        select.append(hitanno_stage("select", data, label_key, panel))
        enc.append(hitanno_stage("encode", data, panel, store, label_key, one_core=one_core_encode))
    return {"select": _median_report(select), "encode": _median_report(enc)}


# -- the synthetic atlas ------------------------------------------------------------------
def write_synthetic(
    path: Path, n_cells: int, n_peaks: int, *, n_types: int = 30, open_per_cell: int = 1000, seed: int = 0
) -> None:
    """A CSR h5ad written chunk by chunk (never the whole matrix in memory)."""
    from anndata.io import write_elem

    rng = np.random.default_rng(seed)
    weights = np.arange(1, n_types + 1, dtype=float) ** -1.1
    sizes = np.maximum((weights / weights.sum() * n_cells).astype(int), 20)
    sizes[0] += n_cells - sizes.sum()
    labels = rng.permutation(np.repeat(np.arange(n_types), sizes))
    programmes = np.stack([rng.choice(n_peaks, 3000, replace=False) for _ in range(n_types)])
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        x = f.create_group("X")
        x.attrs["encoding-type"], x.attrs["encoding-version"] = "csr_matrix", "0.1.0"
        x.attrs["shape"] = (n_cells, n_peaks)
        data = x.create_dataset("data", shape=(0,), maxshape=(None,), dtype="float32", chunks=(1 << 20,))
        indices = x.create_dataset("indices", shape=(0,), maxshape=(None,), dtype="int32", chunks=(1 << 20,))
        indptr = [np.zeros(1, dtype=np.int64)]
        for lo in range(0, n_cells, 5000):
            lab = labels[lo : lo + 5000]
            k = rng.poisson(open_per_cell * rng.lognormal(0, 0.3, len(lab)))
            k_prog = rng.binomial(k, 0.3)
            rows = np.repeat(np.arange(len(lab)), k)
            prog_part = programmes[np.repeat(lab, k_prog), rng.integers(0, 3000, int(k_prog.sum()))]
            bg_part = rng.integers(0, n_peaks, int((k - k_prog).sum()))
            cols = np.empty(rows.size, dtype=np.int64)
            first = np.repeat(np.cumsum(k) - k, k)
            within = np.arange(rows.size) - first
            is_prog = within < np.repeat(k_prog, k)
            cols[is_prog], cols[~is_prog] = prog_part, bg_part
            keys = np.sort(rows.astype(np.int64) * n_peaks + cols)
            keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]  # sorted, unique
            r, c = np.divmod(keys, n_peaks)
            n_old = data.shape[0]
            data.resize((n_old + keys.size,))
            indices.resize((n_old + keys.size,))
            data[n_old:] = np.where(rng.random(keys.size) < 0.1, 2.0, 1.0).astype(np.float32)
            indices[n_old:] = c.astype(np.int32)
            indptr.append(n_old + np.cumsum(np.bincount(r, minlength=len(lab))))
        x.create_dataset("indptr", data=np.concatenate(indptr))
        names = [f"type_{t:02d}" for t in range(n_types)]
        obs = pd.DataFrame(
            {"cell_type": pd.Categorical([names[t] for t in labels], categories=names)},
            index=[f"cell{i}" for i in range(n_cells)],
        )
        starts = np.arange(n_peaks, dtype=np.int64) * 2000
        var = pd.DataFrame(
            {"chrom": "chr1", "start": starts, "end": starts + 500}, index=[f"chr1:{s}-{s + 500}" for s in starts]
        )
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
    tmp.replace(path)


# -- the report ------------------------------------------------------------------------
def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def bench_granja(skip_reference: bool, repeats: int, rounds: int) -> dict:
    """hitanno and the reference in ``rounds`` interleaved rounds; the ratio is taken within a round.

    The machine's speed drifts by tens of percent over minutes; one reference run against
    hitanno's median of another minute's runs made the ratio swing by ±15 %.
    """
    if not GRANJA.exists():
        print(f"skipping Granja: {GRANJA} is absent")
        return {}
    work = WORK / "granja"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    per_round = []
    for _ in range(1 if skip_reference else rounds):
        ours = hitanno_pipeline(GRANJA, "cell_type", work, one_core_encode=False, repeats=repeats)
        entry = {"hitanno": ours}
        if not skip_reference:
            entry["reference"] = _run(
                [sys.executable, "bench/reference_preprocess.py", str(GRANJA), "cell_type", str(work / "reference")]
            )
            o_work = ours["select"]["work_s"] + ours["encode"]["work_s"]
            o_wall = ours["select"]["wall_s"] + ours["encode"]["wall_s"]
            entry["speedup_work"] = entry["reference"]["total_s"] / o_work
            entry["speedup_wall"] = entry["reference"]["wall_s"] / o_wall
        per_round.append(entry)
    result = {"rounds": per_round}
    # the table shows the round with the median work ratio (or the only one), and the medians
    middle = sorted(per_round, key=lambda e: e.get("speedup_work", 0.0))[len(per_round) // 2]
    result.update(hitanno=middle["hitanno"])
    if not skip_reference:
        result.update(
            reference=middle["reference"],
            speedup_work=float(np.median([e["speedup_work"] for e in per_round])),
            speedup_wall=float(np.median([e["speedup_wall"] for e in per_round])),
        )
    return result


def bench_synthetic(sizes: list[int], n_peaks: int, repeats: int) -> dict:
    out = {}
    for n_cells in sizes:
        work = WORK / f"synthetic_{n_cells}"
        work.mkdir(parents=True, exist_ok=True)
        data = work / "atlas.h5ad"
        if not data.exists():
            t = time.perf_counter()
            write_synthetic(data, n_cells, n_peaks)
            print(f"generated {n_cells} × {n_peaks} in {time.perf_counter() - t:.0f} s", flush=True)
        with h5py.File(data, "r") as f:
            nnz = int(f["X/indptr"][-1])
        run = hitanno_pipeline(data, "cell_type", work, one_core_encode=True, repeats=repeats)
        run["nnz_per_cell"] = nnz / n_cells
        run["file_gib"] = data.stat().st_size / 2**30
        out[str(n_cells)] = run
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=200_000, help="synthetic atlas size (largest)")
    parser.add_argument("--small-cells", type=int, default=50_000, help="second, smaller size for the RSS check")
    parser.add_argument("--peaks", type=int, default=100_000)
    parser.add_argument("--skip-reference", action="store_true", help="skip the slow published reference")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument(
        "--repeats", type=int, default=5, help="runs of each hitanno stage per round on Granja (medians reported)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds of hitanno and the reference on Granja (ratio: median over rounds)",
    )
    parser.add_argument(
        "--synthetic-repeats", type=int, default=3, help="runs of each stage on the synthetic atlas (medians reported)"
    )
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"granja": bench_granja(args.skip_reference, args.repeats, args.rounds)}
    if not args.skip_synthetic:
        result["synthetic"] = bench_synthetic(
            sorted({args.small_cells, args.cells}), args.peaks, args.synthetic_repeats
        )
    report(result)
    (RESULTS / "preprocess.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {RESULTS / 'preprocess.json'}")


def report(result: dict) -> None:
    granja = result.get("granja") or {}
    if granja:
        ours = granja["hitanno"]
        rows = []
        o_wall = ours["select"]["wall_s"] + ours["encode"]["wall_s"]
        o_work = ours["select"]["work_s"] + ours["encode"]["work_s"]
        o_rss = max(ours["select"]["peak_rss_mib"], ours["encode"]["peak_rss_mib"])
        rows.append(
            [
                "hitanno select-peaks",
                f"{ours['select']['wall_s']:.2f}",
                f"{ours['select']['work_s']:.2f}",
                f"{ours['select']['peak_rss_mib']:.0f}",
                "",
            ]
        )
        rows.append(
            [
                "hitanno encode",
                f"{ours['encode']['wall_s']:.2f}",
                f"{ours['encode']['work_s']:.2f}",
                f"{ours['encode']['peak_rss_mib']:.0f}",
                "",
            ]
        )
        rows.append(["hitanno total", f"{o_wall:.2f}", f"{o_work:.2f}", f"{o_rss:.0f}", "1.0×"])
        if "reference" in granja:
            ref = granja["reference"]
            work = ref["total_s"]  # like ours: the computation including reading the matrix
            rows.append(
                [
                    "published (reference)",
                    f"{ref['wall_s']:.2f}",
                    f"{work:.2f}",
                    f"{ref['peak_rss_mib']:.0f}",
                    f"{ref['wall_s'] / o_wall:.0f}× wall, {work / o_work:.0f}× work",
                ]
            )
        rounds = granja.get("rounds", [])
        print("\nGranja 14 125 cells × 10 000 peaks: select-peaks + encode")
        print(_table(rows, ["method", "wall s", "work s", "peak RSS MiB", "reference / hitanno"]))
        print(
            f"(wall: whole process incl. interpreter start and imports; work: the computation "
            f"after imports, reading the .h5ad included, for both; the round with the median "
            f"ratio of {len(rounds)}, hitanno's figures the median of "
            f"{ours['select'].get('repeats', 1)} runs in that round)"
        )
        if "speedup_work" in granja:
            per_round = ", ".join(
                f"{e['speedup_work']:.0f}× (reference {e['reference']['total_s']:.1f} s, "
                f"hitanno {e['hitanno']['select']['work_s'] + e['hitanno']['encode']['work_s']:.2f} s)"
                for e in rounds
            )
            print(
                f"reference / hitanno in work, per round: {per_round}; median "
                f"**{granja['speedup_work']:.0f}×** (wall {granja['speedup_wall']:.0f}×)"
            )
    synthetic = result.get("synthetic") or {}
    if synthetic:
        rows = []
        for n, run in synthetic.items():
            n = int(n)
            for stage in ("select", "encode"):
                r = run[stage]
                rows.append(
                    [
                        f"{n:,}",
                        stage + (" (1 core)" if stage == "encode" else ""),
                        f"{r['work_s']:.1f}",
                        f"{n / r['work_s']:,.0f}",
                        f"{r['peak_rss_mib']:.0f}",
                    ]
                )
        first = next(iter(synthetic.values()))
        print(
            f"\nSynthetic atlas: 30 types, {first['nnz_per_cell']:.0f} open peaks per cell "
            f"(median of {first['encode'].get('repeats', 1)} runs)"
        )
        print(_table(rows, ["cells", "stage", "work s", "cells/s", "peak RSS MiB"]))


if __name__ == "__main__":
    main()
