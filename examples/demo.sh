#!/usr/bin/env bash
# The built-in example: simulate a reference/query pair, then run every stage on it.
# Usage: bash examples/demo.sh [OUT_DIR]   (make demo runs it inside the project's .venv)
set -euo pipefail
OUT=${1:-demo_out}
HITANNO=${HITANNO:-.venv/bin/hitanno}
mkdir -p "$OUT"

"$HITANNO" simulate -o "$OUT/data" --overwrite
"$HITANNO" select-peaks "$OUT/data/reference.h5ad" --label-key cell_type -o "$OUT/panel.json" --overwrite
"$HITANNO" encode "$OUT/data/reference.h5ad" --panel "$OUT/panel.json" --label-key cell_type -o "$OUT/reference.zarr" --overwrite
"$HITANNO" encode "$OUT/data/query.h5ad" --panel "$OUT/panel.json" --label-key cell_type -o "$OUT/query.zarr" --overwrite
"$HITANNO" train --sentences "$OUT/reference.zarr" --panel "$OUT/panel.json" -o "$OUT/model" --lr 1e-3 --overwrite
"$HITANNO" predict --model "$OUT/model" --sentences "$OUT/query.zarr" -o "$OUT/predictions" --overwrite
echo "predictions: $OUT/predictions/predictions.csv"
