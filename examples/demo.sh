#!/usr/bin/env bash
# The built-in example (what `make demo` runs): simulate a reference/query pair — or split
# your own labelled .h5ad — and annotate the query with `hitanno run`.
#
#   bash examples/demo.sh [OUT_DIR]
#   DATA=my.h5ad LABEL_KEY=cell_type SPLIT_BY=donor bash examples/demo.sh   # your data
#
# Environment: HITANNO (the command, default .venv/bin/hitanno), SIM_ARGS (extra
# simulate options), RUN_ARGS (extra run options), SPLIT_BY (obs column: one value
# becomes the query; unset = a stratified random 30 % query).
set -euo pipefail
OUT=${1:-demo_out}
HITANNO=${HITANNO:-.venv/bin/hitanno}
LABEL_KEY=${LABEL_KEY:-cell_type}
mkdir -p "$OUT"

if [ -z "${DATA:-}" ]; then
    # shellcheck disable=SC2086
    $HITANNO simulate -o "$OUT/data" --overwrite ${SIM_ARGS:-}
else
    split=(--query-fraction 0.3 --label-key "$LABEL_KEY")
    [ -n "${SPLIT_BY:-}" ] && split=(--by "$SPLIT_BY")
    $HITANNO split "$DATA" -o "$OUT/data" "${split[@]}" --overwrite
fi
# shellcheck disable=SC2086
$HITANNO run --ref "$OUT/data/reference.h5ad" --query "$OUT/data/query.h5ad" \
    --label-key "$LABEL_KEY" -o "$OUT/run" ${RUN_ARGS:-}
echo "report: $OUT/run/report/report.html"
