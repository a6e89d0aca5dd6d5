# Sourced by the training templates (pretrain.sbatch, finetune.sbatch): their shared variables, the
# srun step with per-rank exit files, the requeue decision and the Prometheus target list. Their
# headers document the variables and the behaviour; this file has no #SBATCH lines of its own.
# (Under sbatch the template runs from a copy in Slurm's spool folder, so the templates find this file
# next to themselves when run with bash, else as cluster/slurm/training.sh under the job's working
# directory: submit from the repository root, or pass --chdir to it.)

PREEMPTED=75  # data_tools.errors.ExitCode.PREEMPTED
export RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-relalign}-${SLURM_JOB_ID:-local}}
export PYTHON=${PYTHON:-python}
export METRICS_PORT=${METRICS_PORT:-9400}
export METRICS_HOST=${METRICS_HOST:-0.0.0.0}
DRY_RUN=${DRY_RUN:-0}

# What every task runs: `bash -c "$TASK" relalign-task TRAINER-COMMAND...`. Slurm signals every process
# of the step, so the trainer gets SIGUSR1/SIGTERM itself; this shell only waits for it (the trap keeps
# the shell alive) and records its exit code. `metrics.host=node` becomes the address the task's node
# name resolves to.
# shellcheck disable=SC2016  # expanded by the task's shell
TASK='trap : USR1 TERM
args=()
for arg in "$@"; do
    if [[ $arg == metrics.host=node ]]; then
        arg=metrics.host=$(getent ahostsv4 "$SLURMD_NODENAME" | awk "NR == 1 {print \$1}")
    fi
    args+=("$arg")
done
"$PYTHON" -c "import sys; from pretrain.dist_env import record_rank_host; record_rank_host(sys.argv[1])" "$RUN_DIR" \
    || echo "relalign: rank $SLURM_PROCID could not record its node" >&2
"${args[@]}" &
pid=$!
while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
wait "$pid"; code=$?
echo "$code" > "$RUN_DIR/ranks/rank$SLURM_PROCID.exit"
exit "$code"'

# relalign_print_training TRAINER-COMMAND...: the dry run's description of the training step.
relalign_print_training() {
    printf 'srun --kill-on-bad-exit=1 bash -c TASK, where each task runs:\n  '
    printf '%q ' "$@"
    printf '\n'
}

# relalign_train TRAINER-COMMAND...: run it on every task; requeue the job and exit 75 when a rank
# was preempted, else return the code of the rank that failed first (0 when all succeeded).
relalign_train() {
    local code rank_code f
    if [[ -n "${PROM_TARGETS_DIR:-}" ]]; then relalign_write_targets; fi
    mkdir -p "$RUN_DIR/ranks"
    rm -f "$RUN_DIR"/ranks/rank*.exit  # codes of this attempt only
    echo "relalign: job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} run ${RUN_DIR}" >&2
    # --kill-on-bad-exit: a rank that crashes takes the step down at once (the watchdog covers hangs).
    srun --kill-on-bad-exit=1 bash -c "$TASK" relalign-task "$@"
    code=$?
    if grep -qx "$PREEMPTED" "$RUN_DIR"/ranks/rank*.exit 2>/dev/null; then relalign_requeue; fi
    # The code of the rank that failed first beats srun's (srun reports 143 once it has terminated the
    # other ranks): the oldest non-zero rank<r>.exit.
    # shellcheck disable=SC2012  # our own file names, no spaces
    for f in $(ls -tr "$RUN_DIR"/ranks/rank*.exit 2>/dev/null); do
        rank_code=$(<"$f")
        if [[ $rank_code != 0 ]]; then code=$rank_code; break; fi
    done
    if [[ -n "${PROM_TARGETS_DIR:-}" ]]; then rm -f "$PROM_TARGETS_DIR/relalign-${SLURM_JOB_ID:-local}.json"; fi
    return "$code"
}

# relalign_requeue [REASON]: put the job back in the queue (same id, same RUN_DIR), end this attempt with 75.
relalign_requeue() {
    echo "relalign: ${1:-preempted with a checkpoint saved}; requeueing job ${SLURM_JOB_ID}" >&2
    if [[ -n "${PROM_TARGETS_DIR:-}" ]]; then rm -f "$PROM_TARGETS_DIR/relalign-${SLURM_JOB_ID:-local}.json"; fi
    scontrol requeue "$SLURM_JOB_ID"
    exit $PREEMPTED
}

# Prometheus file-based discovery: one target per rank (port + local rank) on every allocated host.
relalign_write_targets() {
    local hosts per_node targets host i file
    mkdir -p "$PROM_TARGETS_DIR"
    hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null || echo "${SLURMD_NODENAME:-localhost}")
    per_node=${SLURM_NTASKS_PER_NODE:-1}
    targets=""
    for host in $hosts; do
        for ((i = 0; i < per_node; i++)); do targets+="\"$host:$((METRICS_PORT + i))\","; done
    done
    file="$PROM_TARGETS_DIR/relalign-${SLURM_JOB_ID:-local}.json"
    printf '[{"targets": [%s], "labels": {"slurm_job": "%s"}}]\n' "${targets%,}" "${SLURM_JOB_ID:-local}" > "$file.tmp"
    mv "$file.tmp" "$file"
}
