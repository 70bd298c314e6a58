"""GPU checks in one short run: bf16 training and prediction beside the CPU, the level-1
paths' equality on the GPU, and a 2-process ``torchrun`` with NCCL.

Made to be run once on a GPU machine (it needs nothing but this repository):

    .venv/bin/python bench/gpu_check.py                 # ~5 minutes on one GPU
    .venv/bin/python bench/gpu_check.py --cells 3000 --n-peaks 5000 --n-types 10   # a quick look

It simulates an atlas sample (100 types by default), selects peaks and encodes it, then:

* ``train`` for ``--epochs`` epochs on the CPU, on the GPU in fp32 and in bf16 — each
  epoch's cells/s from the model's ``metrics.jsonl``, so start-up is left out;
* ``predict`` of the query with each model, on its device — cells/s and the share of
  labels the GPU models give as the CPU model does, and each model's accuracy;
* the sparse, dense (SDPA) and ``flash`` level-1 paths of one trained model on the same
  GPU batch, fp32 and bf16: the largest difference of logits and attention to the dense
  path (``flash`` needs the ``flash-attn`` package);
* ``torchrun --nproc_per_node 2`` training with NCCL (needs two GPUs: NCCL refuses two
  ranks on one device).

Every check that cannot run says why; the table is printed and the JSON written to
``bench/results/gpu_check.json``.
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


def hitanno(*args: str, log: Path) -> float:
    """Run ``hitanno ARGS -q``; its wall time. A failure raises with the log's tail."""
    started = time.perf_counter()
    with open(log, "wb") as sink:
        code = subprocess.call([sys.executable, "-m", "hitanno_cli", *args, "-q"], cwd=ROOT, stdout=sink, stderr=sink)
    if code != 0:
        raise RuntimeError(log.read_text(errors="replace").strip().splitlines()[-1][:300])
    return time.perf_counter() - started


def epoch_cells_per_s(model: Path, n_cells: int) -> float:
    """Cells over the median epoch's seconds (the first epoch left out when there are more)."""
    lines = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = sorted(m["seconds"] for m in (lines[1:] if len(lines) > 1 else lines))
    return round(n_cells / seconds[len(seconds) // 2], 1)


def check(results: list[dict[str, Any]], name: str, work: Any) -> Any:
    """Run one check; record what it measured, or why it did not run."""
    print(f"-- {name}", file=sys.stderr, flush=True)
    try:
        value = work()
    except Exception as err:  # every check reports, none stops the others
        results.append({"check": name, "status": "failed", "why": f"{type(err).__name__}: {err}"[:400]})
        return None
    if isinstance(value, str):  # a reason it was skipped
        results.append({"check": name, "status": "skipped", "why": value})
        return None
    results.append({"check": name, "status": "ran", **value})
    return value


def path_differences(model_dir: Path, store: Path, device: str) -> dict[str, Any]:
    """Largest |difference| to the dense path of each level-1 path, fp32 and bf16, on one batch."""
    import numpy as np
    import torch

    from hitanno_cli.checkpoint import load_model
    from hitanno_cli.model.attention import attention_for, flash_unavailable_reason
    from hitanno_cli.runtime import autocast
    from hitanno_cli.sentences import SentenceStore

    loaded = load_model(model_dir, device)
    batch = SentenceStore(store).read_open(0, 64)  # the dense path forms every set's full attention
    indptr = torch.from_numpy(batch.indptr).to(device)
    positions = torch.from_numpy(batch.positions).to(device)
    paths = ["sparse", "dense"]
    why_not_flash = flash_unavailable_reason()
    if not why_not_flash:
        paths.append("flash")
    out: dict[str, Any] = {"flash": why_not_flash or "ran", "cells": int(len(indptr) - 1)}
    for precision in ("fp32", "bf16"):
        results = {}
        for path in paths:
            loaded.model.config.attention = path
            loaded.model.level1_attend = attention_for(path)
            with torch.no_grad(), autocast(torch.device(device), precision):
                got = loaded.model(indptr, positions, return_attention=True)
            results[path] = {k: getattr(got, k).float().cpu().numpy() for k in ("logits", "level1_attention")}
        for path in paths:
            if path != "dense":
                for k in ("logits", "level1_attention"):
                    diff = float(np.abs(results[path][k] - results["dense"][k]).max())
                    out[f"{precision}_{path}_vs_dense_{k}_max_abs"] = diff
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=25_000, help="reference + query (80 % / 20 %)")
    parser.add_argument("--n-peaks", type=int, default=50_000)
    parser.add_argument("--n-types", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "gpu_check")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check.json")
    args = parser.parse_args()
    import torch

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    w = args.work
    n_query = args.cells // 5
    n_ref = args.cells - n_query
    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    results: list[dict[str, Any]] = []

    def prepare() -> dict[str, Any]:
        seconds = hitanno("simulate", "-o", str(w / "atlas"), "--n-ref", str(n_ref), "--n-query", str(n_query),
                          "--n-peaks", str(args.n_peaks), "--n-types", str(args.n_types),
                          "--open-fraction", "0.0027", "--programme-share", "0.02", "--programme-boost", "6",
                          log=w / "simulate.log")  # fmt: skip
        seconds += hitanno("select-peaks", str(w / "atlas" / "reference.h5ad"), "-o", str(w / "panel.json"),
                           log=w / "select.log")  # fmt: skip
        for name in ("reference", "query"):
            seconds += hitanno("encode", str(w / "atlas" / f"{name}.h5ad"), "-p", str(w / "panel.json"),
                               "-o", str(w / f"{name}.zarr"), log=w / f"encode_{name}.log")  # fmt: skip
        return {"seconds": round(seconds, 1)}

    if check(results, "simulate, select-peaks, encode", prepare) is None:
        report(results, args, cuda, gpus)
        return
    runs = [("cpu", "fp32", ["--device", "cpu"])]
    runs += [("cuda", p, ["--gpu", "0", "--precision", p]) for p in ("fp32", "bf16")] if cuda else []
    labels: dict[str, Any] = {}
    for device, precision, flags in runs:
        name = f"{device}_{precision}"
        model = w / f"model_{name}"

        def train(model: Path = model, flags: list[str] = flags, name: str = name) -> dict[str, Any]:
            wall = hitanno("train", "--sentences", str(w / "reference.zarr"), "-o", str(model),
                           "--epochs", str(args.epochs), *flags, log=w / f"train_{name}.log")  # fmt: skip
            return {"wall_s": round(wall, 1), "train_cells_per_s": epoch_cells_per_s(model, n_ref)}

        if check(results, f"train {name}", train) is None:
            continue

        def predict(model: Path = model, flags: list[str] = flags, name: str = name) -> dict[str, Any]:
            import pandas as pd

            pred = w / f"pred_{name}"
            device_flags = [f for f in flags if f not in ("--precision", "fp32", "bf16")]
            wall = hitanno("predict", "-m", str(model), "-s", str(w / "query.zarr"), "-o", str(pred), *device_flags,
                           log=w / f"predict_{name}.log")  # fmt: skip
            table = pd.read_csv(pred / "predictions.csv")
            labels[name] = table["predicted"].to_numpy()
            row = {"wall_s": round(wall, 1), "cells_per_s_with_start_up": round(n_query / wall, 1)}
            row["accuracy"] = round(float((table["predicted"] == table["true_label"]).mean()), 4)
            if "cpu_fp32" in labels and name != "cpu_fp32":
                row["same_labels_as_cpu"] = round(float((labels[name] == labels["cpu_fp32"]).mean()), 4)
            return row

        check(results, f"predict {name}", predict)
    check(
        results,
        "level-1 paths on the GPU",
        lambda: path_differences(w / "model_cuda_fp32", w / "query.zarr", "cuda:0") if cuda else "no CUDA device",
    )

    def ddp() -> dict[str, Any] | str:
        if gpus < 2:
            return f"{gpus} GPU(s): NCCL needs a GPU per rank"
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        started = time.perf_counter()
        log = w / "torchrun.log"
        with open(log, "wb") as sink:
            code = subprocess.call([*torchrun, "-m", "hitanno_cli", "train", "--sentences", str(w / "reference.zarr"),
                                    "-o", str(w / "model_ddp"), "--epochs", str(args.epochs), "-q"],
                                   cwd=ROOT, stdout=sink, stderr=sink, env={**os.environ})  # fmt: skip
        if code != 0:
            raise RuntimeError(log.read_text(errors="replace").strip().splitlines()[-1][:300])
        wall = time.perf_counter() - started
        return {"wall_s": round(wall, 1), "train_cells_per_s": epoch_cells_per_s(w / "model_ddp", n_ref)}

    check(results, "torchrun 2 processes, NCCL", ddp)
    report(results, args, cuda, gpus)


def report(results: list[dict[str, Any]], args: argparse.Namespace, cuda: bool, gpus: int) -> None:
    """Print every check's line and write the JSON."""
    import torch

    device = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
    print(f"\n== GPU checks ({device}; torch {torch.__version__})")
    for r in results:
        values = {k: v for k, v in r.items() if k not in ("check", "status")}
        print(f"{r['check']:34} {r['status']:8} {json.dumps(values)}")
    payload = {"settings": {k: str(v) for k, v in vars(args).items()}, "device": device, "gpus": gpus}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**payload, "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
