#!/usr/bin/env bash
# One-shot GPU check of the trainer on a machine with one CUDA GPU (made for one H100 or H200; about 8 minutes).
#
#   bash bench/gpu_check.sh            # results: one JSON object per line on stdout and in $OUT/gpu_check.jsonl
#
# 1. Python: $PYTHON, else .venv/bin/python if it has CUDA torch, else python3. Packages the machine
#    lacks (deepspeed, webdataset, pydantic, hjson...) are installed from the wheels in .whl/ when
#    present (offline: `--no-index`), into a folder of their own put on PYTHONPATH.
# 2. Data: `python -m data_tools build synthetic --image-size 224` (the relational scenes).
# 3. The trainer, the `base` preset (12 x 768), ZeRO 2, once in bf16 and once in fp16 (dynamic loss
#    scaling), each run in its own process through the same code as `python -m pretrain`
#    (`pretrain.train.train`), plus a short run under torch's FlopCounterMode that counts the model
#    FLOPs of a real training step (all encoder passes of ITC, ITM with hard negatives, MLM, IAIS;
#    forward and backward).
# Reported per run: samples/s (median over logging intervals after the first, which holds
# compilation and warm-up), peak GPU memory allocated by torch and reserved by its allocator, model
# FLOPs per sample, and model FLOPs utilisation = FLOPs/sample x samples/s / the GPU's dense peak
# (PEAK_TFLOPS, default 989: H100 SXM bf16/fp16 dense; set it for another card).
# 4. Where the time goes, with the first precision's run: 8 more steps with `profile.enabled`
#    (pretrain.profiling), its summary under "profile": step time, the loop's phases and each
#    objective term, top kernels, attention share, runtime syncs per step, host-blocked and
#    device-busy shares.
# 5. Levers against that bf16 run, same data and steps (LEVERS=0 skips them): torch's fused AdamW
#    (`optimizer.fused=true`), one objective per batch (`objectives.sampling=per_batch`: samples/s
#    and its loss curve in metrics-bf16-per-batch.jsonl), and IAIS off (the IAIS step overhead);
#    a ratio line each (baseline bf16).
# 6. With LARGE_BATCHES="48 32 16": `configs/large.yaml` (24 x 1024) under ZeRO 3, the first of
#    those micro-batches that runs (6 steps) and its samples/s.
# Every step has its own timeout; a failing step is reported as {"error": ...} and the rest goes on.
# About 8 minutes on an H100 without step 6 (each run starts its own process: ~40 s of start-up).
# A CPU dry run of the plumbing (tiny preset, bf16 only): GPU_CHECK_CPU=1 CONFIG=configs/tiny.yaml
#   PRECISIONS=bf16 IMAGE_SIZE=64 SAMPLES=256 STEPS=6 BATCH=8 bash bench/gpu_check.sh
set -x
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/runs/gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/relalign-gpu.XXXXXX)
RESULTS=$OUT/gpu_check.jsonl
: > "$RESULTS"
STEPS=${STEPS:-40}
BATCH=${BATCH:-64}
SAMPLES=${SAMPLES:-4096}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
CONFIG=${CONFIG:-configs/base.yaml}
PRECISIONS=${PRECISIONS:-bf16 fp16}
IMAGE_SIZE=${IMAGE_SIZE:-224}
RUN_TIMEOUT=${RUN_TIMEOUT:-150}
WORKERS=${WORKERS:-8}
if [[ -n "${GPU_CHECK_CPU:-}" ]]; then ACCEL=cpu; NEED='True'; else ACCEL=cuda; NEED='torch.cuda.is_available()'; fi
export DS_ACCELERATOR=$ACCEL HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
report() { echo "$1" | tee -a "$RESULTS"; }

# --- 1. python and packages ------------------------------------------------------------------
pick_python() {
    for candidate in "${PYTHON:-}" "$REPO/.venv/bin/python" python3; do
        [[ -n "$candidate" ]] || continue
        if timeout 120 "$candidate" -c "import torch, sys; sys.exit(0 if $NEED else 1)" 2>/dev/null; then
            echo "$candidate"; return 0
        fi
    done
    return 1
}
PY=$(pick_python) || { report '{"bench": "gpu_check", "error": "no python with CUDA torch found"}'; exit 1; }
if [[ -d .whl ]] && ! timeout 120 "$PY" -c 'import deepspeed, webdataset' 2>/dev/null; then
    timeout 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" .whl/*.whl
    export PYTHONPATH=$WORK/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 120 "$PY" -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))' \
    || { report '{"bench": "gpu_check", "error": "torch/deepspeed import failed (see log)"}'; exit 1; }

# --- 2. data ---------------------------------------------------------------------------------
timeout 150 "$PY" -m data_tools build synthetic --samples "$SAMPLES" --image-size "$IMAGE_SIZE" --seed 0 \
    --workers "$WORKERS" --out "$WORK/data" \
    || { report '{"bench": "gpu_check", "error": "building the synthetic dataset failed"}'; exit 1; }

# --- 3. trainer runs ---------------------------------------------------------------------------
cat > "$WORK/one_run.py" <<'PY'
"""One trainer run of the gpu check: samples/s, peak memory and model FLOPs, one JSON line."""
import json, statistics, sys, time, traceback

import torch

from pretrain import dist_env
from pretrain.config import load_config
from pretrain.metrics import read_jsonl
from pretrain.train import train

label, precision, work, steps, batch, peak_tflops, config = (sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]),
                                                              int(sys.argv[5]), float(sys.argv[6]), sys.argv[7])
workers, profile, extra = int(sys.argv[8]), sys.argv[9] == "1", sys.argv[10:]  # extra: dotted overrides of this run
zero_stage = next((int(o.split("=")[1]) for o in extra if o.startswith("zero.stage=")), 2)
cuda = torch.cuda.is_available() and dist_env.backend() == "nccl"


def overrides(run_dir, n_steps, log_every):
    return [f"data.paths=[{work}/data]", f"run.dir={run_dir}", f"precision={precision}", "zero.stage=2",
            f"train.steps={n_steps}", f"data.batch_size={batch}", f"train.global_batch_size={batch}",
            f"train.log_every={log_every}", "eval.every_steps=0", "checkpoint.every_steps=0",
            "checkpoint.at_end=false", "metrics.port=0", f"data.workers={workers}", *extra]


result = {"bench": "gpu_check", "run": label, "config": config, "precision": precision, "zero_stage": zero_stage,
          "batch": batch, "steps": steps, "overrides": extra, "device": torch.cuda.get_device_name(0) if cuda else "cpu"}
try:
    env = dist_env.detect()
    dist_env.init_distributed(env, timeout_s=600)
    # a) model FLOPs of real training steps (counted, not timed)
    try:
        from torch.utils.flop_counter import FlopCounterMode

        cfg = load_config(config, overrides(f"{work}/flops-{precision}", 2, 1))
        with FlopCounterMode(display=False) as counter:
            train(cfg, env)
        result["model_flops_per_sample"] = counter.get_total_flops() / (2 * batch)
    except Exception as err:  # the timing below is still worth having
        result["flops_error"] = f"{type(err).__name__}: {err}"[:500]
    # b) the timed run
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cfg = load_config(config, overrides(f"{work}/run-{label}", steps, max(1, min(5, steps // 3))))
    start = time.perf_counter()
    code = int(train(cfg, env))
    result.update(exit_code=code, wall_seconds=round(time.perf_counter() - start, 2))
    if cuda:
        torch.cuda.synchronize()
        result.update(peak_memory_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                      peak_memory_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3))
    records = read_jsonl(cfg.run.dir)
    rates = [r["samples_per_second"] for r in records[1:] if r.get("samples_per_second")]
    result["samples_per_second"] = round(statistics.median(rates), 2) if rates else None
    result["data_wait_share"] = round(statistics.median(
        [r["data_wait_seconds"] / r["step_seconds"] for r in records[1:] if r.get("step_seconds")] or [float("nan")]), 3)
    result["final_loss_total"] = records[-1].get("loss/total") if records else None
    result["loss_scale"] = records[-1].get("loss_scale") if records else None
    if result.get("model_flops_per_sample") and result["samples_per_second"]:
        achieved = result["model_flops_per_sample"] * result["samples_per_second"]
        result["model_tflops_per_second"] = round(achieved / 1e12, 2)
        result["mfu"] = round(achieved / (peak_tflops * 1e12), 4)
        result["peak_tflops_assumed"] = peak_tflops
    # c) where the time goes: a profiled run of a few steps (pretrain.profiling), its rank-0 summary
    if profile:
        try:
            cfg = load_config(config, overrides(f"{work}/profile-{label}", 8, 4)
                              + ["profile.enabled=true", "profile.warmup_steps=4", "profile.steps=3", "profile.trace=false"])
            train(cfg, env)
            summary_path = cfg.run.path / "profile" / "rank0.json"
            result["profile"] = json.loads(summary_path.read_text()) if summary_path.exists() else None
        except Exception as err:  # the figures above stand without it
            result["profile_error"] = f"{type(err).__name__}: {err}"[:500]
            traceback.print_exc()
except Exception as err:
    result["error"] = f"{type(err).__name__}: {err}"[:800]
    traceback.print_exc()
print(json.dumps(result), flush=True)
dist_env.shutdown(barrier=False)
dist_env.exit_process(0 if "error" not in result else 1)
PY

# one_run LABEL PRECISION PROFILE [dotted overrides...]: one JSON line into the results
one_run() {
    local label=$1 precision=$2 profile=$3
    shift 3
    timeout "$RUN_TIMEOUT" "$PY" "$WORK/one_run.py" "$label" "$precision" "$WORK" "$STEPS" "$BATCH" "$PEAK_TFLOPS" \
        "$CONFIG" "$WORKERS" "$profile" "$@" > "$OUT/run-$label.log" 2>&1
    echo "exit status $?" >> "$OUT/run-$label.log"
    tail -n 30 "$OUT/run-$label.log"
    local line
    line=$(grep '^{"bench"' "$OUT/run-$label.log" | tail -n 1)
    if [[ "$line" == \{* ]]; then
        report "$line"
    else
        report "{\"bench\": \"gpu_check\", \"run\": \"$label\", \"error\": \"run failed or timed out (see run-$label.log)\"}"
    fi
}

for precision in $PRECISIONS; do
    # the profile (pretrain.profiling) comes with the first precision's run only: GPU time is scarce
    one_run "$precision" "$precision" "$([[ $precision == "${PRECISIONS%% *}" ]] && echo 1 || echo 0)"
done
# Levers measured against the bf16 run above (same data, same steps): torch's fused AdamW, and
# UNITER's one objective per batch (objectives.sampling=per_batch) instead of every objective per batch.
if [[ -n "${LEVERS:-1}" && "${LEVERS:-1}" != 0 ]]; then
    one_run bf16-fused bf16 0 optimizer.fused=true
    one_run bf16-per-batch bf16 0 objectives.sampling=per_batch
    one_run bf16-no-iais bf16 0 iais.enabled=false
fi
# `large` (24 x 1024) under ZeRO 3: the largest micro-batch of LARGE_BATCHES that runs, and its samples/s.
if [[ -n "${LARGE_BATCHES:-}" ]]; then
    for large_batch in $LARGE_BATCHES; do
        BATCH=$large_batch STEPS=6 CONFIG=configs/large.yaml one_run "large-zero3-b$large_batch" bf16 0 zero.stage=3
        if grep -q '"samples_per_second": [0-9]' "$OUT/run-large-zero3-b$large_batch.log"; then break; fi
    done
fi
for run in "$WORK"/run-*/; do
    cp "$run/metrics.jsonl" "$OUT/metrics-$(basename "$run" | sed 's/^run-//').jsonl" 2>/dev/null || true
done
# fp16 against bf16 (the baseline) measured in this same run
"$PY" - "$RESULTS" <<'PY' | tee -a "$RESULTS"
import json, sys
rows = {r.get("run"): r for r in map(json.loads, open(sys.argv[1])) if r.get("run")}
bf16 = rows.get("bf16", {})
for label, metric in (("fp16", "fp16_vs_bf16"), ("bf16-fused", "fused_adamw_vs_default"),
                      ("bf16-per-batch", "per_batch_vs_joint"), ("bf16-no-iais", "iais_off_vs_on")):
    other = rows.get(label, {})
    ratio = (other["samples_per_second"] / bf16["samples_per_second"]
             if other.get("samples_per_second") and bf16.get("samples_per_second") else None)
    print(json.dumps({"bench": "gpu_check", "metric": f"{metric}_samples_per_second", "baseline": "bf16",
                      "ratio": round(ratio, 3) if ratio else None}))
PY
rm -rf "$WORK"
