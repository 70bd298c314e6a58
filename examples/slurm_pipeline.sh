#!/usr/bin/env bash
# A SLURM job chain for hitanno: peak selection on a CPU node, sharded encoding as an
# array job, training on a GPU node, prediction and evaluation on a CPU node. Each job
# starts only when the one before it succeeded (--dependency=afterok).
#
#   bash examples/slurm_pipeline.sh REF.h5ad QUERY.h5ad LABEL_KEY OUT_DIR [N_SHARDS]
#
# Set PARTITION_CPU / PARTITION_GPU / ACCOUNT to your cluster's names, and HITANNO to the
# hitanno command (default: hitanno on PATH, e.g. from an activated environment).
set -euo pipefail
if [ $# -lt 4 ]; then
    echo "usage: $0 REF.h5ad QUERY.h5ad LABEL_KEY OUT_DIR [N_SHARDS]" >&2
    exit 2
fi
REF=$1 QUERY=$2 KEY=$3 OUT=$4 SHARDS=${5:-8}
HITANNO=${HITANNO:-hitanno}
CPU=(--partition="${PARTITION_CPU:-cpu}")
GPU=(--partition="${PARTITION_GPU:-gpu}" --gres=gpu:1)
ACC=()
[ -n "${ACCOUNT:-}" ] && ACC=(--account="$ACCOUNT")
mkdir -p "$OUT/logs"

submit() {  # sbatch ... -> job id
    sbatch --parsable "${ACC[@]}" --output="$OUT/logs/%x-%A_%a.log" "$@"
}

select_job=$(submit "${CPU[@]}" --job-name=select --cpus-per-task=2 --mem=16G --time=01:00:00 \
    --wrap="$HITANNO select-peaks '$REF' -l '$KEY' -o '$OUT/panel.json' --overwrite -q")

# every array task encodes its share; the last one to finish assembles each store
encode_job=$(submit "${CPU[@]}" --job-name=encode --array=0-$((SHARDS - 1)) --cpus-per-task=1 --mem=4G \
    --time=02:00:00 --dependency=afterok:"$select_job" \
    --wrap="$HITANNO encode '$REF' -p '$OUT/panel.json' -l '$KEY' -o '$OUT/reference.zarr' \
              --shard \${SLURM_ARRAY_TASK_ID}/$SHARDS -q &&
            $HITANNO encode '$QUERY' -p '$OUT/panel.json' -o '$OUT/query.zarr' \
              --shard \${SLURM_ARRAY_TASK_ID}/$SHARDS -q")

# Ctrl-C / SIGTERM at the time limit saves a resumable state: resubmit with --resume
train_job=$(submit "${GPU[@]}" --job-name=train --cpus-per-task=8 --mem=32G --time=12:00:00 \
    --signal=B:TERM@120 --dependency=afterok:"$encode_job" \
    --wrap="$HITANNO train -s '$OUT/reference.zarr' -p '$OUT/panel.json' -o '$OUT/model' --gpu 0 --overwrite")

predict_job=$(submit "${CPU[@]}" --job-name=predict --cpus-per-task=4 --mem=16G --time=04:00:00 \
    --dependency=afterok:"$train_job" \
    --wrap="$HITANNO predict -m '$OUT/model' -s '$OUT/query.zarr' -o '$OUT/predictions' --device cpu --overwrite -q")

echo "submitted: select $select_job, encode $encode_job, train $train_job, predict $predict_job"
echo "results will be in $OUT/predictions/predictions.csv"
