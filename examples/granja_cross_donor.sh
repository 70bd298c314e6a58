#!/usr/bin/env bash
# Cross-donor annotation on the real Granja 2019 bone-marrow scATAC-seq set: the
# reference is donor BMMC_D6T1, the query donor BMMC_D5T1 (Granja et al. 2019,
# GEO GSE139369). Needs the data file; writes everything under OUT_DIR.
#
#   bash examples/granja_cross_donor.sh [GRANJA.h5ad] [OUT_DIR] [hitanno run options...]
#
# run self-trains on the query donor by default (pseudo-labels; macro-F1 0.60 -> 0.62
# on this split, docs/recipe.md); `... granja_out --no-self-train` trains on the
# reference alone.
set -euo pipefail
DATA=${1:-../shared/data/granja2019_bmmc_atac.h5ad}
OUT=${2:-granja_out}
HITANNO=${HITANNO:-.venv/bin/hitanno}
if [ ! -f "$DATA" ]; then
    echo "error: $DATA not found; pass the path of granja2019_bmmc_atac.h5ad" >&2
    exit 2
fi
$HITANNO split "$DATA" -o "$OUT/data" --by donor --query-value BMMC_D5T1 --overwrite
$HITANNO run --ref "$OUT/data/reference.h5ad" --query "$OUT/data/query.h5ad" \
    --label-key cell_type -o "$OUT/run" "${@:3}"
echo "report: $OUT/run/report/report.html"
