#!/usr/bin/env bash
# The demo of README.md, from a fresh machine to an evaluated model, on the embedded synthetic scenes:
#   environment -> build train + held-out sets -> verify -> pretrain `tiny` with IAIS and the relation curriculum
#   on 2 processes (DeepSpeed ZeRO 2) -> finetune with the paper's hard-negative recipe (2 processes) ->
#   evaluate (R@1/5/10 both ways, relation sensitivity, ISD/ISDa, plots) -> export -> headline numbers.
# Everything lands in ${DEMO_OUT:-demo_out}/. A second run reuses the environment and the data and skips
# finished stages (each leaves a marker in $OUT/.done/); a failing stage stops the demo with its exit code
# and one line naming the stage and its log.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# One ninja for every process: DeepSpeed rebuilds its CPU comm op whenever the ninja on PATH changes.
export PATH="$PWD/.venv/bin:$PATH"
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=.venv/bin/python
OUT=${DEMO_OUT:-demo_out}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-4000}
FINETUNE_STEPS=${FINETUNE_STEPS:-40}
PORT=${METRICS_PORT:-9400}
mkdir -p "$OUT/.done" "$OUT/logs"

stage() {  # stage NAME COMMAND...: run once (marker in $OUT/.done), log to $OUT/logs/NAME.log, stop on failure
  local name=$1; shift
  if [ -f "$OUT/.done/$name" ]; then echo "== $name: done before (remove $OUT/.done/$name to redo)"; return; fi
  echo "== $name"
  set +e
  "$@" 2>&1 | tee "$OUT/logs/$name.log"
  local code=${PIPESTATUS[0]}
  set -e
  if [ "$code" -ne 0 ]; then
    echo "demo: stage '$name' failed with exit code $code: $(grep -m1 -E 'error:|Error' "$OUT/logs/$name.log" || tail -n1 "$OUT/logs/$name.log") (log: $OUT/logs/$name.log)" >&2
    exit "$code"
  fi
  touch "$OUT/.done/$name"
}

TRAIN="$OUT/data/train" TEST="$OUT/data/test"
stage build-train $PY -m data_tools build synthetic --samples 8192 --seed 0 --split train --shard-samples 2048 \
  --out "$TRAIN"
stage build-test $PY -m data_tools build synthetic --samples 200 --seed 1 --split test --out "$TEST"
stage verify $PY -m data_tools verify "$TRAIN"

# The relation recipe, configs/tiny_relations.yaml (its comments and docs/experiments.md say why): 32 px scenes,
# the relation curriculum (position captions, single-shape views, then full scenes; each phase ends when learned),
# then every objective with each image's own relation- or attribute-swapped caption as an ITM negative; finetuning
# at the paper's lr 5e-5. The demo runs it on 2 ranks x 16 (DeepSpeed ZeRO 2) and shortens it to fit its
# minutes: 4,000 steps, position alone at most to step 2,600 (the preset: 5,000 and 3,000). fp32, as the preset:
# in bf16 at the recipe's held peak lr the full-scene position phase stayed at ln 2 to its limit.
common=(--config configs/tiny_relations.yaml "data.paths=[$TRAIN]" data.batch_size=16 zero.stage=2 precision=fp32
        metrics.port_in_use=next "metrics.port=$PORT")
echo "   (while training, Prometheus metrics: http://127.0.0.1:$PORT/metrics for rank 0, port $((PORT + 1)) for rank 1;"
echo "    or the next free ports: each rank prints its \"metrics:\" line)"
stage pretrain $PY -m torch.distributed.run --nproc_per_node 2 --master_port "$(( (RANDOM % 20000) + 30000 ))" \
  -m pretrain "${common[@]}" objectives.position.hold_steps=2600 "run.dir=$OUT/pretrain" "train.steps=$PRETRAIN_STEPS" \
  --resume auto
stage finetune $PY -m torch.distributed.run --nproc_per_node 2 --master_port "$(( (RANDOM % 20000) + 30000 ))" \
  -m finetune "${common[@]}" --init "$OUT/pretrain" "run.dir=$OUT/finetune" \
  "train.steps=$FINETUNE_STEPS" --resume auto
stage evaluate $PY -m finetune evaluate "$OUT/finetune" --data "$TEST" --mode rerank --k 16 --name heldout --no-progress
stage export $PY -m pretrain export "$OUT/finetune" --out "$OUT/export"
$PY scripts/demo_summary.py "$OUT"
