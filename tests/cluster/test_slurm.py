"""cluster/slurm/*.sbatch against a real Slurm (2 nodes on this host, tests/cluster/slurm_cluster.py).

One uninterrupted 2-node x 1-task job of the tiny preset is the reference (module fixture): it must
finish with ranks 0 and 1 on different nodes, a checkpoint and metrics, and a real Prometheus must
discover both ranks from the target list the template writes. A second job is preempted for real
(`scancel --signal=USR1`, as Slurm does before the time limit) and must requeue itself, resume from
`latest` and end with the reference's final step, data order (recorded keys) and weights. A bad
config ends the job with code 2 without a requeue. build_shards.sbatch runs as a job array whose
merge job waits with --dependency=afterok.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.conftest import require
from tests.cluster.prometheus_server import Prometheus
from tests.cluster.slurm_cluster import NODES, SlurmCluster
from tests.conftest import REPO, free_port
from tests.pretrain.runs import assert_same_weights, build_synthetic, env_for, latest_tag, model_state, read_keys

pytestmark = [pytest.mark.cluster, pytest.mark.multiprocess, pytest.mark.slow]

TEMPLATE = REPO / "cluster" / "slurm" / "pretrain.sbatch"
SHARDS_TEMPLATE = REPO / "cluster" / "slurm" / "build_shards.sbatch"
STEPS, BATCH = 32, 4  # two epochs of the 128 scenes: several Prometheus scrapes of a rising counter, an epoch boundary
JOB_TIMEOUT_S = 420
# The test cluster has no GPUs and 2 CPUs per node: override the template's GPU directives.
SMALL = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]


def job_env(**extra: str) -> dict[str, str]:
    """The submitting environment (sbatch exports it to the job): CPU, 1 thread, PYTHON = this interpreter.

    PATH stays as the other tests have it: the venv's pip `ninja` differs from the system's, and
    DeepSpeed's JIT-built CPU comm op is rebuilt (minutes) each time the ninja version changes."""
    env = env_for()
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, CONFIG="configs/tiny.yaml", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def overrides(data: Path, *more: str) -> list[str]:
    return [f"data.paths=[{data}]", f"data.batch_size={BATCH}", f"train.steps={STEPS}", "train.log_every=1",
            "train.record_keys=true", "checkpoint.every_steps=0", "train.lost_rank_timeout_s=120", *more]


def submit(slurm: SlurmCluster, out: Path, env: dict[str, str], args: list[str], *, wait: bool,
           template: Path = TEMPLATE) -> tuple[str, int]:
    """sbatch the template (with --wait: until it ends); returns the job id and sbatch's exit code."""
    cmd = ["sbatch", "--parsable", *SMALL, f"--chdir={REPO}", f"--output={out}/slurm-%j.out",
           *(["--wait"] if wait else []), str(template), *args]
    proc = slurm.run(*cmd, env={**env, "SLURM_CONF": str(slurm.conf)}, check=False, timeout=JOB_TIMEOUT_S)
    job_id = (proc.stdout.strip().splitlines() or [""])[0].split(";")[0]
    assert job_id.isdigit(), proc.stdout + proc.stderr
    return job_id, proc.returncode


def job_output(out: Path, job_id: str) -> str:
    path = out / f"slurm-{job_id}.out"
    return path.read_text(errors="replace")[-6000:] if path.exists() else "(no output)"


def wait_job(slurm: SlurmCluster, job_id: str, timeout: float = JOB_TIMEOUT_S) -> str:
    """Poll until the job reaches a final state; returns it (COMPLETED, FAILED, ...)."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = slurm.job_field(job_id, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(0.5)
    slurm.run("scancel", job_id, check=False)
    pytest.fail(f"job {job_id} still {state} after {timeout} s")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return build_synthetic(tmp_path_factory.mktemp("slurm-data") / "synthetic", samples=128)


@pytest.fixture(scope="module")
def reference(slurm, dataset, tmp_path_factory):
    """The uninterrupted job, watched by a real Prometheus while it trains: (run_dir, job_id, code, polls)."""
    require(shutil.which("prometheus") is not None, "prometheus absent (apt: prometheus)")
    tmp = tmp_path_factory.mktemp("slurm-reference")
    run_dir, targets = tmp / "run", tmp / "targets"
    prometheus = Prometheus(tmp / "prometheus", targets).start()
    env = job_env(RUN_DIR=str(run_dir), PROM_TARGETS_DIR=str(targets), METRICS_HOST="node",
                  METRICS_PORT=str(free_port()))
    polls: list[dict[str, float]] = []  # rank -> relalign_steps_total, one dict per query
    try:
        start = time.monotonic()
        proc = subprocess.Popen(["sbatch", "--parsable", "--wait", *SMALL, f"--chdir={REPO}",
                                 f"--output={tmp}/slurm-%j.out", str(TEMPLATE), *overrides(dataset, "metrics.enabled=true")],
                                env={**env, "SLURM_CONF": str(slurm.conf)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        while proc.poll() is None and time.monotonic() - start < JOB_TIMEOUT_S:
            result = prometheus.query('relalign_steps_total{job="relalign"}')
            polls.append({r["metric"]["rank"]: float(r["value"][1]) for r in result})
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
        stdout, stderr = proc.communicate(timeout=60)
        seconds = time.monotonic() - start
    finally:
        prometheus.stop()
    job_id = stdout.strip().splitlines()[0] if stdout.strip() else "?"
    print(f"reference Slurm job: {seconds:.1f} s")
    return {"run_dir": run_dir, "job_id": job_id, "code": proc.returncode, "polls": polls, "out": tmp,
            "stderr": stderr, "targets": targets}


def test_two_node_job_trains_with_one_rank_per_node(slurm, reference):
    run_dir, job_id = reference["run_dir"], reference["job_id"]
    assert reference["code"] == 0, reference["stderr"] + job_output(reference["out"], job_id)
    ranks = {int(p.stem[4:]): json.loads(p.read_text()) for p in (run_dir / "ranks").glob("rank*.json")}
    assert sorted(ranks) == [0, 1]
    assert {ranks[0]["slurmd_nodename"], ranks[1]["slurmd_nodename"]} == set(NODES)
    assert ranks[0]["slurm_job_id"] == job_id and ranks[0]["slurm_restart_count"] == 0
    assert (run_dir / "checkpoints" / latest_tag(run_dir)).is_dir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if r.get("kind") == "train") == STEPS
    assert slurm.job_field(job_id, "Restarts") == "0"
    assert not list(reference["targets"].glob("*.json"))  # the target list goes with the job


def test_prometheus_discovers_both_ranks_from_the_templates_target_list(reference):
    assert reference["code"] == 0, reference["stderr"]
    polls = reference["polls"]
    seen = [p for p in polls if p]
    assert seen, f"Prometheus never scraped a relalign_steps_total series ({len(polls)} queries)"
    for rank in ("0", "1"):
        values = [p[rank] for p in seen if rank in p]
        assert values, f"rank {rank} never scraped: {seen[-3:]}"
        assert max(values) > min(values), f"rank {rank}'s step counter did not rise: {values}"


def test_preempted_job_requeues_and_ends_like_the_uninterrupted_one(slurm, dataset, reference, tmp_path):
    assert reference["code"] == 0, reference["stderr"]
    run_dir = tmp_path / "run"
    env = job_env(RUN_DIR=str(run_dir))
    job_id, _ = submit(slurm, tmp_path, env, overrides(dataset, "metrics.enabled=false"), wait=False)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:  # preempt once a few steps are done, as Slurm would
        steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()] if metrics.exists() else []
        if steps and max(steps) >= 4:
            break
        assert slurm.job_field(job_id, "JobState") in ("PENDING", "RUNNING", "CONFIGURING"), job_output(tmp_path, job_id)
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", job_id)
    state = wait_job(slurm, job_id)
    output = job_output(tmp_path, job_id)
    assert state == "COMPLETED", output
    assert slurm.job_field(job_id, "Restarts") == "1", output
    assert "preempted (SIGUSR1)" in output and "requeueing job" in output and "resumed from" in output, output
    # the same final step, data order and weights as the uninterrupted job
    assert latest_tag(run_dir) == latest_tag(reference["run_dir"])
    keys, reference_keys = read_keys(run_dir), read_keys(reference["run_dir"])
    assert len({(e, k) for e, _, k in keys}) == len(keys), "a sample was consumed twice in one epoch"
    assert sorted(keys) == sorted(reference_keys)
    assert_same_weights(model_state(run_dir / "checkpoints" / latest_tag(run_dir)),
                        model_state(reference["run_dir"] / "checkpoints" / latest_tag(reference["run_dir"])))


def test_a_bad_config_ends_the_job_with_its_code_and_no_requeue(slurm, dataset, tmp_path):
    env = job_env(RUN_DIR=str(tmp_path / "run"))
    job_id, code = submit(slurm, tmp_path, env, overrides(dataset, "train.steps=minus-one"), wait=True)
    output = job_output(tmp_path, job_id)
    assert code == 2, output
    assert slurm.job_field(job_id, "JobState") == "FAILED" and slurm.job_field(job_id, "ExitCode") == "2:0"
    assert slurm.job_field(job_id, "Restarts") == "0"
    assert "train.steps" in output and "requeueing" not in output and output.count("restart 0") == 1


def test_dry_run_prints_the_command_and_submits_nothing(tmp_path):
    proc = subprocess.run(["bash", str(TEMPLATE), "train.steps=3"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1", "CONFIG": "configs/tiny.yaml", "RUN_DIR": "runs/x"},
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "python -m pretrain --config configs/tiny.yaml --resume auto run.dir=runs/x" in proc.stdout
    assert proc.stdout.rstrip().endswith("train.steps=3") and not (tmp_path / "logs").exists()


def test_build_shards_array_then_merge_after_ok_equals_one_build(slurm, tmp_path):
    from tests.data_tools.test_merge_resume import same_dataset

    out, args = tmp_path / "parts", "--samples 24 --shard-samples 4 --seed 3"
    env = job_env(FORMAT="synthetic", ARGS=args, OUT=str(out), SLURM_CONF=str(slurm.conf))
    proc = slurm.run("sbatch", "--parsable", "--array=0-1", "--cpus-per-task=1", f"--chdir={tmp_path}",
                     f"--output={tmp_path}/shards-%A_%a.out", str(SHARDS_TEMPLATE), env=env)
    array_id = proc.stdout.strip().split(";")[0]
    for task in (0, 1):
        assert wait_job(slurm, f"{array_id}_{task}") == "COMPLETED", job_output(tmp_path, f"{array_id}_{task}")
    first = (tmp_path / f"shards-{array_id}_0.out").read_text()
    merge_id = first.split("Submitted batch job ")[1].split()[0]
    assert wait_job(slurm, merge_id) == "COMPLETED", (tmp_path / "logs").iterdir()
    assert slurm.job_field(merge_id, "JobName") == "relalign-shards-merge"
    # the merge started only after both parts ended (afterok on the whole array)
    ends = [slurm.job_field(f"{array_id}_{t}", "EndTime") for t in (0, 1)]
    assert slurm.job_field(merge_id, "StartTime") >= max(ends)
    verify = subprocess.run([sys.executable, "-m", "data_tools", "verify", str(out)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "data_tools", "build", "synthetic", *args.split(), "--out", str(one)],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    same_dataset(one, out)


def test_build_shards_dry_run_prints_the_merge_and_the_build(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "FORMAT": "synthetic", "OUT": "data/x", "ARGS": "--samples 8",
           "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_JOB_ID": "41"}
    proc = subprocess.run(["bash", str(SHARDS_TEMPLATE)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    merge, build = proc.stdout.splitlines()
    assert merge.startswith("sbatch --dependency=afterok:41 --job-name=relalign-shards-merge")
    assert build.strip() == ("srun python -m data_tools build synthetic --samples 8 --out data/x --workers 1 "
                             "--num-parts 2 --part 0")
    assert not (tmp_path / "logs").exists()


def trainer_pid(job_id: str, rank: int) -> int | None:
    """The `python -m pretrain` process of one rank of one job (read from /proc: our job's variables)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if cmdline[1:3] != [b"-m", b"pretrain"]:  # not the task's bash, whose arguments are the command
                continue
            environ = dict(item.split(b"=", 1) for item in (proc / "environ").read_bytes().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if environ.get(b"SLURM_JOB_ID") == job_id.encode() and environ.get(b"SLURM_PROCID") == str(rank).encode():
            return int(proc.name)
    return None


def test_a_rank_killed_with_sigkill_ends_the_job_with_137_and_no_requeue(slurm, dataset, tmp_path):
    run_dir = tmp_path / "run"
    job_id, _ = submit(slurm, tmp_path, job_env(RUN_DIR=str(run_dir)),
                       overrides(dataset, "metrics.enabled=false", "train.steps=200"), wait=False)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and slurm.job_field(job_id, "JobState") in ("PENDING", "RUNNING"), \
            job_output(tmp_path, job_id)
        time.sleep(0.2)
    pid = trainer_pid(job_id, 1)
    assert pid is not None
    os.kill(pid, 9)
    state = wait_job(slurm, job_id)
    output = job_output(tmp_path, job_id)
    assert state == "FAILED" and slurm.job_field(job_id, "ExitCode") == "137:0", output
    assert slurm.job_field(job_id, "Restarts") == "0" and "requeueing" not in output
    assert (run_dir / "ranks" / "rank1.exit").read_text().strip() == "137"
