"""Start-up of the command line: wall time of commands that only parse their options.

Each command line (``hitanno --help``, ``hitanno train --help``, …) is run as a fresh
process, ``--repeats`` times, alternating with the interpreter alone (``python -c pass``)
so that both see the same machine load; the table gives medians and the heavy libraries
the command loaded. With ``--baseline-tree DIR`` (a checkout of another revision) each
command also runs from that tree, in the same alternation: paired before/after figures.

Usage::

    python bench/startup.py
    git worktree add /tmp/before <rev> && python bench/startup.py --baseline-tree /tmp/before

Results are printed and written to ``bench/results/startup.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (["--help"], ["train", "--help"], ["select-peaks", "--help"], ["predict", "--help"], ["run", "--help"])
HEAVY = ("torch", "anndata", "zarr", "pandas", "scipy", "numpy", "rich")
#: Runs ``hitanno ARGS`` from the tree given first (an editable install's finder, which
#: would import the installed tree whatever the path, is taken out); with ``--loaded`` it
#: also prints which heavy libraries were imported.
RUNNER = (
    "import json, sys\n"
    "tree, report, *args = sys.argv[1:]\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__]\n"
    "sys.path.insert(0, tree)\n"
    "from hitanno_cli.__main__ import main\n"
    "sys.argv = ['hitanno', *args]\n"
    "try:\n    main()\nexcept SystemExit:\n    pass\n"
    f"if report == '--loaded':\n    print('LOADED', json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
)


def hitanno(tree: Path, args: list[str], report: str = "") -> subprocess.CompletedProcess:
    """One fresh process running ``hitanno ARGS`` from ``tree``."""
    argv = [sys.executable, "-c", RUNNER, str(tree), report or "-", *args]
    return subprocess.run(argv, env={**os.environ, "COLUMNS": "80"}, capture_output=True, text=True, check=True)


def timed(run) -> float:
    """Seconds one call of ``run`` takes."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def loaded(args: list[str], tree: Path) -> list[str]:
    """The heavy libraries a command line imports."""
    line = [ln for ln in hitanno(tree, args, "--loaded").stdout.splitlines() if ln.startswith("LOADED")][-1]
    return json.loads(line.removeprefix("LOADED "))


def measure(repeats: int, baseline: Path | None) -> list[dict]:
    trees = {"now": ROOT} if baseline is None else {"before": baseline, "now": ROOT}
    rows = []
    for args in COMMANDS:
        times: dict[str, list[float]] = {name: [] for name in [*trees, "python"]}
        for _ in range(repeats):
            times["python"].append(timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True)))
            for name, tree in trees.items():
                times[name].append(timed(lambda tree=tree, args=args: hitanno(tree, args)))
        row = {"command": "hitanno " + " ".join(args), "python_s": statistics.median(times["python"])}
        for name, tree in trees.items():
            row[f"{name}_s"] = statistics.median(times[name])
            row[f"{name}_loads"] = loaded(args, tree)
        if baseline is not None:
            row["before_over_now"] = row["before_s"] / row["now_s"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--baseline-tree", type=Path, help="a checkout of another revision, run in the same loop")
    args = parser.parse_args()
    rows = measure(args.repeats, args.baseline_tree)
    for row in rows:
        cells = [f"{row['command']:<30}", f"python {row['python_s']:.3f} s"]
        if "before_s" in row:
            cells.append(f"before {row['before_s']:.3f} s {row['before_loads']}")
        cells.append(f"now {row['now_s']:.3f} s {row['now_loads']}")
        if "before_over_now" in row:
            cells.append(f"{row['before_over_now']:.2f}x")
        print(" | ".join(cells))
    out = ROOT / "bench" / "results" / "startup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
