#!/usr/bin/env bash
# The demo of README.md: on the embedded synthetic dataset, build shards, verify them, stream one
# epoch through the loader, pretrain the `tiny` model with IAIS on CPU, and export its weights.
# Everything lands in ${DEMO_OUT:-demo_out}/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# One ninja for every process: DeepSpeed rebuilds its CPU comm op whenever the ninja on PATH changes.
export PATH="$PWD/.venv/bin:$PATH"
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=.venv/bin/python
OUT=${DEMO_OUT:-demo_out}
mkdir -p "$OUT"

echo "== 1/5 build the synthetic relational-scenes dataset"
$PY -m data_tools build synthetic --samples 1024 --seed 0 --shard-samples 256 --out "$OUT/synthetic"
echo "== 2/5 verify it against dataset.json"
$PY -m data_tools verify "$OUT/synthetic"
echo "== 3/5 stream one epoch as 2 ranks x 2 workers would see it (exactly-once check)"
$PY -m data_tools stream "$OUT/synthetic" --world-size 2 --workers 2 --batch-size 16 > "$OUT/stream.txt"
total=$(wc -l < "$OUT/stream.txt"); unique=$(cut -d' ' -f3 "$OUT/stream.txt" | sort -u | wc -l)
echo "streamed $total samples, $unique distinct keys"
[ "$total" = "$unique" ]
echo "== 4/5 pretrain the tiny model with IAIS (1 process, CPU)"
$PY -m pretrain --config configs/tiny.yaml "data.paths=[$OUT/synthetic]" "run.dir=$OUT/run" metrics.port_in_use=next --resume auto
echo "== 5/5 export consolidated weights"
$PY -m pretrain export "$OUT/run" --out "$OUT/export"
echo "demo done: see $OUT/run/metrics.jsonl and $OUT/export"
