#!/usr/bin/env bash
# GPU check of the trainer on a machine with one CUDA GPU (made for one H100 or H200) in one call of at
# most 8 minutes, offline: Python 3.12 with a CUDA torch is all the machine needs beyond this checkout.
#
#   bash scripts/gpu_wheels.sh                        # here, with network: the wheels it lacks into .whl/
#   GPU_CHECK_MODE=smoke bash bench/gpu_check.sh      # on the GPU machine, first: under 60 s
#   bash bench/gpu_check.sh [OUT_DIR]                 # then the measurements (about 7.5 minutes)
#
# Results: one JSON object per line on stdout, each printed as soon as it is measured, also in
# OUT_DIR/gpu_check.jsonl (OUT_DIR: the argument, else $OUT, else runs/gpu_check). Everything the
# stages print goes to OUT_DIR/gpu_check.log; the only other files are the bf16 and per_batch runs'
# metrics-*.jsonl: at most 8 files in all. A failing or timed-out stage is reported as {"error": ...}
# (the tail of its log on stderr) and the rest goes on; what was printed before it stands.
#
# Stages, each under its own timeout (the sum is below 8 minutes; BUDGET_S caps the whole):
# 1. install (30 s): Python is $PYTHON, else .venv/bin/python if it has a CUDA torch, else python3. Of the
#    wheels in .whl/, those whose package the machine lacks are installed offline (`pip install --no-index
#    --no-deps`) into a folder of their own put on PYTHONPATH: the machine's torch and packages are never
#    replaced.
# 2. imports (30 s): every package the trainer and loader import, the GPU (a matmul, a pinned copy).
#    Missing ones are named; the check stops there.
# 3. data (40 s): `python -m data_tools build synthetic` (the relational scenes).
# 4. runs: the trainer, the `base` preset (12 x 768), ZeRO 2, each run its own process through the same
#    code as `python -m pretrain` (`pretrain.train.train`). First the baseline, bf16 (110 s: with two
#    steps under torch's FlopCounterMode that count the model FLOPs of a real training step), then, each
#    followed at once by its ratio to the baseline's samples/s: fp16 with dynamic loss scaling (70 s),
#    torch's fused AdamW (60 s), one objective per batch (`objectives.sampling=per_batch`, 60 s; its loss
#    curve in metrics-bf16-per-batch.jsonl), IAIS off (60 s). LEVERS=0 skips the last three.
#    Per run: samples/s (median over logging intervals after the first, which holds warm-up), peak GPU
#    memory allocated and reserved, model FLOPs per sample, MFU = FLOPs/sample x samples/s / PEAK_TFLOPS
#    (default 989: H100 SXM bf16/fp16 dense; set it for another card).
# 5. profile (what is left, up to 60 s): 8 bf16 steps with `profile.enabled` (pretrain.profiling): step
#    time, the loop's phases and objective terms, top kernels, attention share, syncs per step.
# 6. With LARGE_BATCHES="48 32 16" (and BUDGET_S raised: it does not fit the 8 minutes):
#    `configs/large.yaml` (24 x 1024) under ZeRO 3, the first of those micro-batches that runs (6 steps).
#
# GPU_CHECK_MODE=smoke (BUDGET_S 60): stages 1-3 on 64 images of 64 px, then one training step of the
# `tiny` preset in bf16 with one loader worker (the pixel pool and the pinned copies included).
# A CPU dry run of the plumbing (what tests/test_gpu_check.py runs in smoke mode):
#   GPU_CHECK_CPU=1 GPU_CHECK_MODE=smoke bash bench/gpu_check.sh /tmp/gpu_check
# and of the full sequence on the tiny preset (a few minutes on CPU):
#   GPU_CHECK_CPU=1 CONFIG=configs/tiny.yaml PRECISIONS=bf16 IMAGE_SIZE=64 SAMPLES=256 STEPS=6 BATCH=8 \
#     LEVERS=0 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${1:-${OUT:-$REPO/runs/gpu_check}}
MODE=${GPU_CHECK_MODE:-full}
case "$MODE" in
    smoke) BUDGET_S=${BUDGET_S:-60}; CONFIG=${CONFIG:-configs/tiny.yaml}; PRECISIONS=${PRECISIONS:-bf16}
           IMAGE_SIZE=${IMAGE_SIZE:-64}; SAMPLES=${SAMPLES:-64}; STEPS=${STEPS:-1}; BATCH=${BATCH:-8}
           WORKERS=${WORKERS:-1}; LEVERS=0 ;;
    full) BUDGET_S=${BUDGET_S:-470} ;;
    *) echo "gpu_check: GPU_CHECK_MODE=$MODE is not allowed: expected smoke or full" >&2; exit 2 ;;
esac
STEPS=${STEPS:-40}
BATCH=${BATCH:-64}
SAMPLES=${SAMPLES:-2048}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
CONFIG=${CONFIG:-configs/base.yaml}
PRECISIONS=${PRECISIONS:-bf16 fp16}
IMAGE_SIZE=${IMAGE_SIZE:-224}
WORKERS=${WORKERS:-8}
LEVERS=${LEVERS:-1}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/relalign-gpu.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
RESULTS=$OUT/gpu_check.jsonl
LOG=$OUT/gpu_check.log
: > "$RESULTS"
: > "$LOG"
START=$SECONDS
if [[ -n "${GPU_CHECK_CPU:-}" ]]; then ACCEL=cpu; NEED='True'; else ACCEL=cuda; NEED='torch.cuda.is_available()'; fi
export DS_ACCELERATOR=$ACCEL HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

report() { echo "$1" | tee -a "$RESULTS"; }
error() { report "{\"bench\": \"gpu_check\", \"mode\": \"$MODE\", \"stage\": \"$1\", \"error\": \"$2\"}"; }

# stage NAME LIMIT_S COMMAND...: COMMAND under a timeout of LIMIT_S or what is left of BUDGET_S, whichever
# is less; its output into $WORK/stage.out and the log; JSON lines it prints are reported at once.
stage() {
    local name=$1 limit=$2
    shift 2
    local left=$(( BUDGET_S - (SECONDS - START) - 2 ))
    (( left < limit )) && limit=$left
    if (( limit < 5 )); then
        error "$name" "skipped: the ${BUDGET_S} s budget is spent"
        return 124
    fi
    echo "=== $name: up to $limit s, at $(( SECONDS - START )) s ===" >> "$LOG"
    local began=$SECONDS status
    timeout -k 2 "$limit" "$@" > "$WORK/stage.out" 2>&1
    status=$?
    cat "$WORK/stage.out" >> "$LOG"
    echo "=== $name: exit $status after $(( SECONDS - began )) s ===" >> "$LOG"
    grep '^{"bench"' "$WORK/stage.out" | while IFS= read -r line; do report "$line"; done
    if (( status != 0 )); then
        echo "--- gpu_check: stage $name exit $status; its last lines:" >&2
        tail -n 15 "$WORK/stage.out" >&2
    fi
    return $status
}

# --- 1. python and packages ------------------------------------------------------------------
pick_python() {
    for candidate in "${PYTHON:-}" "$REPO/.venv/bin/python" python3; do
        [[ -n "$candidate" ]] || continue
        if timeout 60 "$candidate" -c "import torch, sys; sys.exit(0 if $NEED else 1)" 2>/dev/null; then
            echo "$candidate"; return 0
        fi
    done
    return 1
}
PY=$(pick_python) || { error python "no python with a CUDA torch found (set PYTHON)"; exit 1; }
# its own bin first: DeepSpeed rebuilds its JIT ops (a minute on CPU) when another ninja comes first on PATH
PATH=$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH
install_missing() {  # the wheels of .whl/ whose package this python lacks, into $WORK/site
    local missing
    missing=$("$PY" - "$REPO/.whl" <<'PY'
import importlib.metadata as md, pathlib, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = wheel.name.split("-")[0]
    if name.lower().startswith(("torch", "nvidia", "triton")):
        continue  # never replace the machine's torch
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(wheel)
PY
    ) || return 1
    echo "missing here, installed from .whl: ${missing:-nothing}"
    [[ -z "$missing" ]] && return 0
    # shellcheck disable=SC2086  # one wheel path per word
    "$PY" -m pip install -q --no-index --find-links "$REPO/.whl" --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --target "$WORK/site" $missing
}
if [[ -d .whl ]]; then
    export -f install_missing
    export PY REPO WORK
    stage install 30 bash -c install_missing \
        || { error install "installing the wheels of .whl/ failed (see the log)"; exit 1; }
    export PYTHONPATH=$PYTHONPATH:$WORK/site PATH=$WORK/site/bin:$PATH  # after the machine's own packages
fi

# --- 2. imports and the device ---------------------------------------------------------------
cat > "$WORK/imports.py" <<'PY'
"""Every package the check needs, imported; the device used once (a matmul and a pinned, non-blocking copy)."""
import importlib, importlib.metadata as md, json, sys, time

mode, accel = sys.argv[1], sys.argv[2]
modules = {"torch": "torch", "deepspeed": "deepspeed", "numpy": "numpy", "webdataset": "webdataset",
           "braceexpand": "braceexpand", "hostlist": "python-hostlist", "hjson": "hjson", "pydantic": "pydantic",
           "simplejpeg": "simplejpeg", "PIL": "pillow", "pyarrow": "pyarrow", "transformers": "transformers",
           "tokenizers": "tokenizers", "safetensors": "safetensors", "yaml": "pyyaml", "tqdm": "tqdm",
           "prometheus_client": "prometheus-client", "psutil": "psutil", "msgpack": "msgpack", "einops": "einops",
           "cpuinfo": "py-cpuinfo", "ninja": "ninja", "data_tools.loader": None, "pretrain.train": None}
result = {"bench": "gpu_check", "mode": mode, "stage": "imports", "python": sys.version.split()[0], "versions": {},
          "missing": []}
start = time.perf_counter()
for module, dist in modules.items():
    try:
        importlib.import_module(module)
        if dist:
            result["versions"][dist] = md.version(dist)
    except Exception as err:  # a missing package, or one that fails to import: name it
        result["missing"].append(f"{module}: {type(err).__name__}: {err}"[:200])
result["import_seconds"] = round(time.perf_counter() - start, 1)
if not result["missing"]:
    import torch

    device = torch.device("cuda" if accel == "cuda" else "cpu")
    if device.type == "cuda":
        result["device"] = torch.cuda.get_device_name(0)
        result["cuda"] = torch.version.cuda
        host = torch.arange(1 << 20, dtype=torch.float32).pin_memory()
        on_device = host.to(device, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(on_device.cpu(), host)
    x = torch.randn(256, 256, device=device)
    result["matmul_ok"] = bool(torch.isfinite(x @ x).all())
else:
    result["error"] = "packages missing: prepare them with `ALL=1 bash scripts/gpu_wheels.sh` and copy .whl/ along"
print(json.dumps(result), flush=True)
sys.exit(1 if result["missing"] else 0)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$LOG" 2>&1 || true
stage imports 30 "$PY" "$WORK/imports.py" "$MODE" "$ACCEL" || exit 1

# --- 3. data ---------------------------------------------------------------------------------
stage data 40 "$PY" -m data_tools build synthetic --samples "$SAMPLES" --image-size "$IMAGE_SIZE" --seed 0 \
    --workers "$(( WORKERS > 0 ? WORKERS : 1 ))" --out "$WORK/data" \
    || { error data "building the synthetic dataset failed"; exit 1; }

# --- 4. trainer runs ---------------------------------------------------------------------------
cat > "$WORK/one_run.py" <<'PY'
"""One trainer run of the gpu check: samples/s, peak memory and model FLOPs (or the profile), one JSON line."""
import json, statistics, sys, time, traceback

import torch

from pretrain import dist_env
from pretrain.config import load_config
from pretrain.metrics import read_jsonl
from pretrain.train import train

label, precision, work, steps, batch, peak_tflops, config = (sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]),
                                                              int(sys.argv[5]), float(sys.argv[6]), sys.argv[7])
workers, what, mode, extra = int(sys.argv[8]), sys.argv[9], sys.argv[10], sys.argv[11:]  # extra: dotted overrides
zero_stage = next((int(o.split("=")[1]) for o in extra if o.startswith("zero.stage=")), 2)
cuda = torch.cuda.is_available() and dist_env.backend() == "nccl"


def overrides(run_dir, n_steps, log_every):
    return [f"data.paths=[{work}/data]", f"run.dir={run_dir}", f"precision={precision}", "zero.stage=2",
            f"train.steps={n_steps}", f"data.batch_size={batch}", f"train.global_batch_size={batch}",
            f"train.log_every={log_every}", "eval.every_steps=0", "checkpoint.every_steps=0",
            "checkpoint.at_end=false", "metrics.port=0", f"data.workers={workers}", *extra]


result = {"bench": "gpu_check", "mode": mode, "run": label, "config": config, "precision": precision,
          "zero_stage": zero_stage, "batch": batch, "steps": steps, "overrides": extra,
          "device": torch.cuda.get_device_name(0) if cuda else "cpu"}
try:
    env = dist_env.detect()
    dist_env.init_distributed(env, timeout_s=600)
    if what == "profile":  # where the time goes: a few profiled steps (pretrain.profiling), the rank-0 summary
        profiled = ["profile.enabled=true", "profile.warmup_steps=4", "profile.steps=3", "profile.trace=false"]
        cfg = load_config(config, overrides(f"{work}/profile-{label}", 8, 4) + profiled)
        result["exit_code"] = int(train(cfg, env))
        summary_path = cfg.run.path / "profile" / "rank0.json"
        result["profile"] = json.loads(summary_path.read_text()) if summary_path.exists() else None
    else:
        if what == "flops":  # model FLOPs of real training steps (counted, not timed)
            try:
                from torch.utils.flop_counter import FlopCounterMode

                cfg = load_config(config, overrides(f"{work}/flops-{label}", 2, 1))
                with FlopCounterMode(display=False) as counter:
                    train(cfg, env)
                result["model_flops_per_sample"] = counter.get_total_flops() / (2 * batch)
            except Exception as err:  # the timing below is still worth having
                result["flops_error"] = f"{type(err).__name__}: {err}"[:500]
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
        shares = [r["data_wait_seconds"] / r["step_seconds"] for r in records[1:] if r.get("step_seconds")]
        result["data_wait_share"] = round(statistics.median(shares), 3) if shares else None
        result["final_loss_total"] = records[-1].get("loss/total") if records else None
        result["loss_scale"] = records[-1].get("loss_scale") if records else None
        if result.get("model_flops_per_sample") and result["samples_per_second"]:
            achieved = result["model_flops_per_sample"] * result["samples_per_second"]
            result["model_tflops_per_second"] = round(achieved / 1e12, 2)
            result["mfu"] = round(achieved / (peak_tflops * 1e12), 4)
            result["peak_tflops_assumed"] = peak_tflops
    if result.get("exit_code"):
        result["error"] = f"the run ended with exit code {result['exit_code']}"
except Exception as err:
    result["error"] = f"{type(err).__name__}: {err}"[:800]
    traceback.print_exc()
print(json.dumps(result), flush=True)
dist_env.shutdown(barrier=False)
dist_env.exit_process(0 if "error" not in result else 1)
PY

# one_run LABEL PRECISION WHAT LIMIT_S [dotted overrides...]: one run as a stage (WHAT: flops, timed or profile)
one_run() {
    local label=$1 precision=$2 what=$3 limit=$4
    shift 4
    stage "$label" "$limit" "$PY" "$WORK/one_run.py" "$label" "$precision" "$WORK" "$STEPS" "$BATCH" "$PEAK_TFLOPS" \
        "$CONFIG" "$WORKERS" "$what" "$MODE" "$@"
    local status=$?
    grep -q "\"run\": \"$label\"" "$RESULTS" \
        || error "$label" "the run failed or timed out (exit $status, see gpu_check.log)"
    if [[ "$label" == bf16 || "$label" == bf16-per-batch ]]; then
        cp "$WORK/run-$label/metrics.jsonl" "$OUT/metrics-$label.jsonl" 2>/dev/null || true
    fi
}

# ratio LABEL METRIC: LABEL's samples/s over the baseline's (bf16), printed at once
ratio() {
    report "$("$PY" - "$RESULTS" "$1" "$2" <<'PY'
import json, sys
rows = {r.get("run"): r for r in map(json.loads, open(sys.argv[1])) if r.get("run")}
base, other = rows.get("bf16", {}).get("samples_per_second"), rows.get(sys.argv[2], {}).get("samples_per_second")
print(json.dumps({"bench": "gpu_check", "metric": f"{sys.argv[3]}_samples_per_second", "baseline": "bf16",
                  "ratio": round(other / base, 3) if base and other else None}))
PY
    )"
}

if [[ "$MODE" == smoke ]]; then
    one_run smoke bf16 timed "$BUDGET_S"
else
    first=1
    for precision in $PRECISIONS; do
        if (( first )); then one_run "$precision" "$precision" flops 110; first=0
        else one_run "$precision" "$precision" timed 70; ratio "$precision" "${precision}_vs_bf16"; fi
    done
    if [[ "$LEVERS" != 0 ]]; then
        one_run bf16-fused bf16 timed 60 optimizer.fused=true
        ratio bf16-fused fused_adamw_vs_default
        one_run bf16-per-batch bf16 timed 60 objectives.sampling=per_batch
        ratio bf16-per-batch per_batch_vs_joint
        one_run bf16-no-iais bf16 timed 60 iais.enabled=false
        ratio bf16-no-iais iais_off_vs_on
    fi
    one_run profile bf16 profile 60
    if [[ -n "${LARGE_BATCHES:-}" ]]; then
        for large_batch in $LARGE_BATCHES; do
            label=large-zero3-b$large_batch
            BATCH=$large_batch STEPS=6 CONFIG=configs/large.yaml one_run "$label" bf16 timed 150 zero.stage=3
            if grep -q "\"run\": \"$label\".*\"samples_per_second\": [0-9]" "$RESULTS"; then break; fi
        done
    fi
fi
files=$(find "$OUT" -maxdepth 1 -type f | wc -l)
report "{\"bench\": \"gpu_check\", \"mode\": \"$MODE\", \"stage\": \"done\", \"seconds\": $(( SECONDS - START )), \
\"out_files\": $files}"
