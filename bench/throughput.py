"""Training and inference throughput of HitAnno on CPU, against the published way, in one run.

Compares, at equal model size (published sizes) on the Granja shape (16 sets × 625 peaks,
~164 open peaks per cell, random sentences at that density):

* ``reference`` — ``bench/reference_model.py``: eager BERT attention, fp32, batch 4,
  dense ``[B, T, P]`` inputs (how the published code ran);
* ``dense`` — hitanno's own dense SDPA level-1 path (batch 4);
* ``sparse`` — hitanno's exact sparse level-1 path (the default), at ``--batch-size``.

Each measurement runs in its own subprocess so its peak RSS is its own. The reference runs
once; dense and sparse run in ``--rounds`` interleaved rounds (default 3), and the table
gives medians, with × dense the median of the ratios taken within a round (this machine's
speed drifts by ±20 % over minutes). Then a sweep of
peaks per type shows the sparse path's cost following the open peaks, not ``P²``.
Prints a table and writes ``bench/results/throughput.json``.

    .venv/bin/python bench/throughput.py            # full run (a few minutes on 2 cores)
    .venv/bin/python bench/throughput.py --quick    # fewer repeats, one round, a shorter sweep
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hitanno_cli.model import HitAnno, ModelConfig  # noqa: E402

N_TYPES, PEAKS, OPEN_PER_CELL = 16, 625, 164.0
DENSITY = OPEN_PER_CELL / (N_TYPES * PEAKS)


# -- what one worker measures ---------------------------------------------------------------
def random_batch(n_cells: int, n_positions: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR open positions of random sentences at the Granja density, and random labels."""
    gen = torch.Generator().manual_seed(seed)
    states = torch.rand(n_cells, n_positions, generator=gen) < DENSITY
    rows, positions = states.nonzero(as_tuple=True)
    indptr = torch.zeros(n_cells + 1, dtype=torch.long)
    indptr[1:] = torch.bincount(rows, minlength=n_cells).cumsum(0)
    return indptr, positions, torch.randint(0, N_TYPES, (n_cells,), generator=gen)


def build(path: str, peaks: int) -> tuple[torch.nn.Module, object]:
    """The model for ``path`` and a function mapping a CSR batch to its logits."""
    torch.manual_seed(0)
    config = ModelConfig(n_types=N_TYPES, peaks_per_type=peaks, attention="dense" if path == "dense" else "sparse")
    if path == "reference":
        from bench.reference_model import ReferenceHitAnno

        model = ReferenceHitAnno(config)

        def logits(indptr: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            states = torch.zeros(indptr.numel() - 1, N_TYPES * peaks)
            rows = torch.repeat_interleave(torch.arange(indptr.numel() - 1), indptr.diff())
            states[rows, positions] = 1.0
            return model(states.view(-1, N_TYPES, peaks))
    else:
        model = HitAnno(config)

        def logits(indptr: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return model(indptr, positions).logits

    return model, logits


def measure(spec: dict) -> dict:
    """Median cells/s over timed steps (after warm-up), and this process's peak RSS.

    Every path runs with the allocator setting ``hitanno train`` uses (all alike)."""
    from hitanno_cli.host import keep_freed_memory

    spec["keep_freed_memory"] = keep_freed_memory()
    model, logits = build(spec["path"], spec["peaks"])
    batches = [
        random_batch(spec["batch"], N_TYPES * spec["peaks"], seed) for seed in range(spec["warmup"] + spec["steps"])
    ]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    if spec["mode"] == "train":
        model.train()
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
        for i, (indptr, positions, labels) in enumerate(batches):
            start = time.perf_counter()
            optimiser.zero_grad(set_to_none=True)
            F.cross_entropy(logits(indptr, positions), labels).backward()
            optimiser.step()
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - start)
    else:
        model.eval()
        with torch.inference_mode():
            for i, (indptr, positions, _) in enumerate(batches):
                start = time.perf_counter()
                logits(indptr, positions)
                if i >= spec["warmup"]:
                    times.append(time.perf_counter() - start)
    open_peaks = statistics.fmean(float(b[0][-1]) / spec["batch"] for b in batches)
    return {
        **spec,
        "cells_per_s": spec["batch"] / statistics.median(times),
        "step_s": times,
        "open_per_cell": open_peaks,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "base_rss_mb": base_rss,
    }


def run_worker(spec: dict) -> dict:
    """Measure ``spec`` in a fresh interpreter (so peak memory is the measurement's own)."""
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- FLOPs ----------------------------------------------------------------------------------------
def forward_flops_per_cell(
    path: str, peaks: int, batch: int, open_peaks: float, *, d: int = 128, ff: int = 128, hidden: int = 64
) -> float:
    """Multiply-adds × 2 of one forward pass per cell (matmuls and attention only)."""
    t = N_TYPES
    finish = 2 * d * d + 4 * d * ff  # out-projection + feed-forward, per token
    level2_full = (t + 1) * (6 * d * d + finish) + 4 * (t + 1) ** 2 * d
    head = 2 * d * hidden + 2 * hidden * t
    if path == "reference":
        tokens = t * (peaks + 1)
        level1 = tokens * (6 * d * d + finish) + 4 * t * (peaks + 1) ** 2 * d
        return level1 + level2_full + head
    # level 2's last layer computes CLS only, by folded one-query attention (EncoderLayer.first_token):
    # q, W_kᵀq and W_v·(Σ a x) are D² each; scores and the weighted sum are (T+1)·D·H each
    heads2 = 16
    level2_cls = 6 * d * d + 4 * (t + 1) * d * heads2 + finish
    if path == "dense":
        level1 = t * (peaks + 1) * 4 * d * d + t * (2 * d * d + 4 * (peaks + 1) * d + finish)
        return level1 + level2_cls + head
    heads = 16
    panel = 2 * t * peaks * (2 * d * d + 2 * heads * d)  # V and folded q·K for both states
    gather = open_peaks * (2 * heads + d)
    return panel / batch + gather + t * finish + level2_cls + head


def matmul_gflops() -> tuple[float, float | None]:
    """This machine's fp32 GEMM rate right now (2048² matmuls), for scale: through torch's
    matmul (MKL here), and through oneDNN's kernel where torch has it (on AMD CPUs MKL's
    generic code path reaches only about half of what the hardware does)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)

    def rate(product) -> float:
        product()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            product()
            times.append(time.perf_counter() - start)
        return 2 * 2048**3 / statistics.median(times) / 1e9

    try:  # a private op (torch's inductor uses it): measured only, never used by hitanno
        onednn = rate(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    except (AttributeError, RuntimeError):
        onednn = None
    return rate(lambda: a @ b), onednn


# -- the run --------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--batch-size",
        default="512,2048,4096",
        help="sparse-path batch sizes, comma-separated (the sweep uses the first)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats, one round, shorter sweep")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of dense and sparse measurements, interleaved (medians are reported)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return

    batch_sizes = [int(b) for b in str(args.batch_size).split(",")]
    args.batch_size = batch_sizes[0]
    args.rounds = 1 if args.quick else max(1, args.rounds)
    slow = dict(batch=4, warmup=0, steps=1 if args.quick else 2)
    # the first sparse steps grow the heap (fresh pages are slow to touch here): warm up past them
    fast = dict(batch=batch_sizes[0], warmup=4, steps=3 if args.quick else 7)
    plans = [("dense", dict(slow, warmup=4, steps=2 if args.quick else 5))]  # the sparse path's warm-up
    plans += [("sparse", dict(fast, batch=b)) for b in batch_sizes]
    gflops_limit = matmul_gflops()

    def measured(path: str, mode: str, plan: dict, peaks: int = PEAKS) -> dict:
        r = run_worker(dict(path=path, mode=mode, peaks=peaks, **plan))
        flops = forward_flops_per_cell(path, peaks, r["batch"], r["open_per_cell"])
        r["gflop_per_cell"] = flops * (3 if mode == "train" else 1) / 1e9
        r["gflop_per_s"] = r["gflop_per_cell"] * r["cells_per_s"]
        print(
            f"  measured {path:9s} {mode:5s} P={peaks:5d} batch {r['batch']:5d}: {r['cells_per_s']:10.2f} cells/s",
            file=sys.stderr,
        )
        return r

    # the reference once (minutes); dense and sparse in interleaved rounds, so that a ratio is
    # taken between measurements minutes apart at most, and its median over rounds reported
    results = [measured("reference", mode, slow) for mode in ("train", "infer")]
    rounds = [
        [measured(path, mode, plan) for path, plan in plans for mode in ("train", "infer")] for _ in range(args.rounds)
    ]
    results += [median_round([rnd[i] for rnd in rounds]) for i in range(len(rounds[0]))]

    sweep = [
        measured("sparse", mode, fast, peaks)
        for peaks in ((64, 625, 2000) if args.quick else (64, 250, 625, 2000, 4000))
        for mode in ("train", "infer")
    ]

    report(results, sweep, gflops_limit, args)


def median_round(runs: list[dict]) -> dict:
    """The run with the median cells/s over rounds, carrying every round's figure."""
    ranked = sorted(runs, key=lambda r: r["cells_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "cells_per_s_rounds": [r["cells_per_s"] for r in runs]}


def report(
    results: list[dict], sweep: list[dict], gflops_limit: tuple[float, float | None], args: argparse.Namespace
) -> None:
    """Print the tables and write the JSON."""
    by = {(r["path"], r["mode"]): r for r in results}
    print(
        f"\nThroughput on CPU ({torch.get_num_threads()} threads), Granja shape "
        f"{N_TYPES}×{PEAKS}, ~{OPEN_PER_CELL:.0f} open peaks/cell; fp32 GEMM here: {gflops_limit[0]:.1f} GFLOP/s"
        + (f" through torch's matmul, {gflops_limit[1]:.1f} through oneDNN's kernel" if gflops_limit[1] else "")
    )
    print(
        f"{'path':10s} {'mode':6s} {'batch':>5s} {'cells/s':>10s} {'× ref':>10s} {'× dense':>9s} "
        f"{'GFLOP/cell':>11s} {'GFLOP/s':>8s} {'peak MB':>8s}"
    )
    for r in results:
        ref, dense = by[("reference", r["mode"])], by[("dense", r["mode"])]
        r["x_reference"] = r["cells_per_s"] / ref["cells_per_s"]
        if "cells_per_s_rounds" in r:  # the median of the ratios taken within each round
            r["x_dense_rounds"] = [a / b for a, b in zip(r["cells_per_s_rounds"], dense["cells_per_s_rounds"])]
            r["x_dense"] = statistics.median(r["x_dense_rounds"])
        else:
            r["x_dense"] = r["cells_per_s"] / dense["cells_per_s"]
        print(
            f"{r['path']:10s} {r['mode']:6s} {r['batch']:5d} {r['cells_per_s']:10.2f} {r['x_reference']:10.1f} "
            f"{r['x_dense']:9.1f} {r['gflop_per_cell']:11.4f} {r['gflop_per_s']:8.2f} {r['peak_rss_mb']:8.0f}"
        )
    if args.rounds > 1:
        print(
            f"(dense and sparse: median of {args.rounds} interleaved rounds; × dense is the median of the "
            "within-round ratios)"
        )
    print(
        f"\nSparse path, peaks per type swept (batch {args.batch_size}; cost per cell should follow open peaks, not P²)"
    )
    print(
        f"{'P':>5s} {'open/cell':>9s} {'train c/s':>10s} {'infer c/s':>10s} {'µs/open peak (infer)':>21s} "
        f"{'P² growth':>10s} {'peak MB':>8s}"
    )
    first = None
    for peaks in sorted({r["peaks"] for r in sweep}):
        tr = next(r for r in sweep if r["peaks"] == peaks and r["mode"] == "train")
        inf = next(r for r in sweep if r["peaks"] == peaks and r["mode"] == "infer")
        first = first or peaks
        per_open = 1e6 / inf["cells_per_s"] / max(inf["open_per_cell"], 1e-9)
        print(
            f"{peaks:5d} {inf['open_per_cell']:9.1f} {tr['cells_per_s']:10.1f} {inf['cells_per_s']:10.1f} "
            f"{per_open:21.2f} {(peaks / first) ** 2:10.0f} {max(tr['peak_rss_mb'], inf['peak_rss_mb']):8.0f}"
        )
    out = ROOT / "bench" / "results" / "throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "matmul_gflop_per_s": gflops_limit[0],
                "onednn_gflop_per_s": gflops_limit[1],
                "sparse_batch": args.batch_size,
                "quick": args.quick,
                "rounds": args.rounds,
                "results": results,
                "sweep": sweep,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
