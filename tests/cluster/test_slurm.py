"""cluster/slurm/*.sbatch against a real Slurm (2 nodes on this host, tests/cluster/slurm_cluster.py).

Every job is submitted from a folder laid out like a fresh clone (no logs/): Slurm opens the job's
output file before the script runs, so a template whose --output names a missing folder fails there.
The pretraining and shard-building jobs are the README's own command lines (tests/cluster/
readme_commands.py reads them from README.md; the test adds no option, only the environment).

The README's 2-node x 1-task pretraining job is the reference (module fixture): it must finish with
ranks 0 and 1 on different nodes, a checkpoint and metrics, and a real Prometheus must discover both
ranks from the target list the template writes. The same command is then preempted for real (the
README's `scancel --signal=USR1`, as Slurm does before the time limit) and must requeue itself, resume
from `latest` and end with the reference's final step, data order (recorded keys) and weights. A bad
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

from tests.cluster.prometheus_server import Prometheus
from tests.cluster.readme_commands import Command, fresh_clone, readme_command, sbatch_command
from tests.cluster.slurm_cluster import NODES, SlurmCluster
from tests.conftest import REPO, free_port, require
from tests.pretrain.runs import assert_same_weights, build_synthetic, env_for, latest_tag, model_state, read_keys

pytestmark = [pytest.mark.cluster, pytest.mark.multiprocess, pytest.mark.slow]

TEMPLATE = REPO / "cluster" / "slurm" / "pretrain.sbatch"
SHARDS_TEMPLATE = REPO / "cluster" / "slurm" / "build_shards.sbatch"
STEPS, BATCH = 32, 4  # the tests beside the README's job: two epochs of the 128 scenes
SCENES = 128  # the README job's data/synthetic: its 16 steps x 32 samples are 4 epochs, with boundaries
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
    return [
        f"data.paths=[{data}]",
        f"data.batch_size={BATCH}",
        f"train.steps={STEPS}",
        "train.log_every=1",
        "train.record_keys=true",
        "checkpoint.every_steps=0",
        "train.lost_rank_timeout_s=120",
        *more,
    ]


def readme_env(slurm: SlurmCluster, command: Command, **host: str) -> dict[str, str]:
    """The environment a README command runs in: job_env, then the README's assignments, then `host`
    (values that name this host's resources, replacing the README's); metrics on each node's own
    address, at a port free here."""
    return {
        **job_env(METRICS_HOST="node", METRICS_PORT=str(free_port())),
        **command.env,
        **host,
        "SLURM_CONF": str(slurm.conf),
    }


def submit(
    slurm: SlurmCluster,
    clone: Path,
    env: dict[str, str],
    args: list[str],
    *,
    wait: bool,
    template: str = "pretrain.sbatch",
) -> tuple[str, int]:
    """sbatch a template from `clone` (a fresh clone: fresh_clone) with the test cluster's sizes, adding
    no --output (with --wait: until it ends); returns the job id and sbatch's exit code."""
    cmd = ["sbatch", "--parsable", *SMALL, *(["--wait"] if wait else []), f"cluster/slurm/{template}", *args]
    proc = slurm.run(*cmd, env={**env, "SLURM_CONF": str(slurm.conf)}, check=False, timeout=JOB_TIMEOUT_S, cwd=clone)
    job_id = (proc.stdout.strip().splitlines() or [""])[0].split(";")[0]
    assert job_id.isdigit(), proc.stdout + proc.stderr
    return job_id, proc.returncode


def job_output(clone: Path, job_id: str) -> str:
    """The end of the job's output file: the template's `<job name>-<job id>.out` in the submit folder."""
    paths = list(clone.glob(f"*-{job_id}.out"))
    return paths[0].read_text(errors="replace")[-6000:] if paths else f"(no *-{job_id}.out in {clone})"


def submitted_job_id(stdout: str) -> str:
    """The job id from plain sbatch's "Submitted batch job N"."""
    assert "Submitted batch job " in stdout, stdout
    return stdout.split("Submitted batch job ")[1].split()[0]


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
    """The README job's data/synthetic (any fresh clone links it there)."""
    return build_synthetic(tmp_path_factory.mktemp("slurm-data") / "synthetic", samples=SCENES)


def clone_with_data(where: Path, dataset: Path) -> Path:
    """A fresh clone whose data/synthetic is the module's dataset."""
    clone = fresh_clone(where)
    (clone / "data").mkdir()
    (clone / "data" / "synthetic").symlink_to(dataset)
    return clone


@pytest.fixture(scope="module")
def reference(slurm, dataset, tmp_path_factory):
    """The README's pretraining command, uninterrupted, watched by a real Prometheus while it trains:
    (run_dir, job_id, code, polls, ...)."""
    require(shutil.which("prometheus") is not None, "prometheus absent (apt: prometheus)")
    tmp = tmp_path_factory.mktemp("slurm-reference")
    clone = clone_with_data(tmp / "relalign", dataset)
    command, targets = sbatch_command("pretrain.sbatch"), tmp / "targets"
    prometheus = Prometheus(tmp / "prometheus", targets).start()
    env = readme_env(slurm, command, PROM_TARGETS_DIR=str(targets))
    polls: list[dict[str, float]] = []  # rank -> relalign_steps_total, one dict per query
    try:
        start = time.monotonic()
        proc = subprocess.Popen(
            command.argv, cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
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
    job_id = submitted_job_id(stdout) if "Submitted batch job" in stdout else "?"
    print(f"reference Slurm job: {seconds:.1f} s")
    return {
        "run_dir": clone / command.env["RUN_DIR"],
        "job_id": job_id,
        "code": proc.returncode,
        "polls": polls,
        "out": clone,
        "stderr": stderr,
        "targets": targets,
        "steps": int(_override(command, "train.steps")),
    }


def _override(command: Command, name: str) -> str:
    return next(a.split("=", 1)[1] for a in command.argv if a.startswith(f"{name}="))


def test_two_node_job_trains_with_one_rank_per_node(slurm, reference):
    run_dir, job_id = reference["run_dir"], reference["job_id"]
    assert reference["code"] == 0, reference["stderr"] + job_output(reference["out"], job_id)
    ranks = {int(p.stem[4:]): json.loads(p.read_text()) for p in (run_dir / "ranks").glob("rank*.json")}
    assert sorted(ranks) == [0, 1]
    assert {ranks[0]["slurmd_nodename"], ranks[1]["slurmd_nodename"]} == set(NODES)
    assert ranks[0]["slurm_job_id"] == job_id and ranks[0]["slurm_restart_count"] == 0
    assert (run_dir / "checkpoints" / latest_tag(run_dir)).is_dir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if r.get("kind") == "train") == reference["steps"]
    assert slurm.job_field(job_id, "Restarts") == "0"
    assert not list(reference["targets"].glob("*.json"))  # the target list goes with the job
    assert not (reference["out"] / "logs").exists()


def test_prometheus_discovers_both_ranks_from_the_templates_target_list(reference):
    assert reference["code"] == 0, reference["stderr"]
    polls = reference["polls"]
    seen = [p for p in polls if p]
    assert seen, f"Prometheus never scraped a relalign_steps_total series ({len(polls)} queries)"
    for rank in ("0", "1"):
        values = [p[rank] for p in seen if rank in p]
        assert values, f"rank {rank} never scraped: {seen[-3:]}"
        # The README's job logs every train.log_every=10 steps: the scrapes saw a logged step while it ran.
        assert max(values) >= 1, f"rank {rank}'s step counter never counted a step: {values}"


def test_preempted_job_requeues_and_ends_like_the_uninterrupted_one(slurm, dataset, reference, tmp_path):
    assert reference["code"] == 0, reference["stderr"]
    clone = clone_with_data(tmp_path / "relalign", dataset)
    command = sbatch_command("pretrain.sbatch")
    run_dir = clone / command.env["RUN_DIR"]
    env = readme_env(slurm, command, PROM_TARGETS_DIR=str(tmp_path / "targets"))
    proc = subprocess.Popen(
        command.argv, cwd=clone, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        # Preempt once both ranks are in the loop (each has recorded a consumed batch), as Slurm would.
        keys = [run_dir / "keys" / f"rank{r}.txt" for r in (0, 1)]
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not all(k.exists() and k.stat().st_size for k in keys):
            assert proc.poll() is None, f"sbatch ended ({proc.returncode}) before both ranks trained"
            assert time.monotonic() < deadline, f"no rank trained within {JOB_TIMEOUT_S} s"
            time.sleep(0.2)
        job_id = str(json.loads((run_dir / "ranks" / "rank0.json").read_text())["slurm_job_id"])
        scancel = readme_command("scancel", "--signal=USR1")
        slurm.run(*[job_id if a == "JOBID" else a for a in scancel.argv])
        state = wait_job(slurm, job_id)
    finally:
        proc.kill()  # sbatch --wait polls Slurm every few minutes; the job's own state is known already
        proc.communicate(timeout=60)
    output = job_output(clone, job_id)
    assert state == "COMPLETED", output
    assert slurm.job_field(job_id, "Restarts") == "1", output
    assert "preempted (SIGUSR1)" in output and "requeueing job" in output and "resumed from" in output, output
    # the same final step, data order and weights as the uninterrupted job
    assert latest_tag(run_dir) == latest_tag(reference["run_dir"])
    keys, reference_keys = read_keys(run_dir), read_keys(reference["run_dir"])
    assert len({(e, k) for e, _, k in keys}) == len(keys), "a sample was consumed twice in one epoch"
    assert sorted(keys) == sorted(reference_keys)
    assert_same_weights(
        model_state(run_dir / "checkpoints" / latest_tag(run_dir)),
        model_state(reference["run_dir"] / "checkpoints" / latest_tag(reference["run_dir"])),
    )


def test_a_bad_config_ends_the_job_with_its_code_and_no_requeue(slurm, dataset, tmp_path):
    clone = fresh_clone(tmp_path / "relalign")
    env = job_env(RUN_DIR=str(tmp_path / "run"))
    job_id, code = submit(slurm, clone, env, overrides(dataset, "train.steps=minus-one"), wait=True)
    output = job_output(clone, job_id)
    assert code == 2, output
    assert slurm.job_field(job_id, "JobState") == "FAILED" and slurm.job_field(job_id, "ExitCode") == "2:0"
    assert slurm.job_field(job_id, "Restarts") == "0"
    assert "train.steps" in output and "requeueing" not in output and output.count("restart 0") == 1


def test_dry_run_prints_the_command_and_submits_nothing(tmp_path):
    proc = subprocess.run(
        ["bash", str(TEMPLATE), "train.steps=3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "DRY_RUN": "1", "CONFIG": "configs/tiny.yaml", "RUN_DIR": "runs/x"},
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert "python -m pretrain --config configs/tiny.yaml --resume auto run.dir=runs/x" in proc.stdout
    assert proc.stdout.rstrip().endswith("train.steps=3") and not (tmp_path / "logs").exists()


def test_build_shards_array_then_merge_after_ok_equals_one_build(slurm, tmp_path):
    from tests.data_tools.test_merge_resume import same_dataset

    clone = fresh_clone(tmp_path / "relalign")
    command = sbatch_command("build_shards.sbatch")
    out, args = clone / command.env["OUT"], command.env["ARGS"]
    env = readme_env(slurm, command)
    proc = slurm.run(*command.argv, env=env, cwd=clone)
    array_id = submitted_job_id(proc.stdout)
    for task in (0, 1):
        assert wait_job(slurm, f"{array_id}_{task}") == "COMPLETED", job_output(clone, f"{array_id}_{task}")
    first = (clone / f"relalign-shards-{array_id}_0.out").read_text()
    merge_id = submitted_job_id(first)
    assert wait_job(slurm, merge_id) == "COMPLETED", job_output(clone, merge_id)
    assert slurm.job_field(merge_id, "JobName") == "relalign-shards-merge"
    assert (clone / f"relalign-shards-merge-{merge_id}.out").exists() and not (clone / "logs").exists()
    # the merge started only after both parts ended (afterok on the whole array)
    ends = [slurm.job_field(f"{array_id}_{t}", "EndTime") for t in (0, 1)]
    assert slurm.job_field(merge_id, "StartTime") >= max(ends)
    verify = subprocess.run(
        [sys.executable, "-m", "data_tools", "verify", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    one = tmp_path / "one"
    subprocess.run(
        [sys.executable, "-m", "data_tools", "build", command.env["FORMAT"], *args.split(), "--out", str(one)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    same_dataset(one, out)


def test_build_shards_dry_run_prints_the_merge_and_the_build(tmp_path):
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "FORMAT": "synthetic",
        "OUT": "data/x",
        "ARGS": "--samples 8",
        "SLURM_ARRAY_TASK_COUNT": "2",
        "SLURM_ARRAY_TASK_ID": "0",
        "SLURM_ARRAY_JOB_ID": "41",
    }
    proc = subprocess.run(
        ["bash", str(SHARDS_TEMPLATE)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    merge, build = proc.stdout.splitlines()
    assert merge.startswith("sbatch --dependency=afterok:41 --job-name=relalign-shards-merge")
    assert build.strip() == (
        "srun python -m data_tools build synthetic --samples 8 --out data/x --workers 1 --num-parts 2 --part 0"
    )
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
    run_dir, clone = tmp_path / "run", fresh_clone(tmp_path / "relalign")
    job_id, _ = submit(
        slurm,
        clone,
        job_env(RUN_DIR=str(run_dir)),
        overrides(dataset, "metrics.enabled=false", "train.steps=200"),
        wait=False,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and slurm.job_field(job_id, "JobState") in ("PENDING", "RUNNING"), (
            job_output(clone, job_id)
        )
        time.sleep(0.2)
    pid = trainer_pid(job_id, 1)
    assert pid is not None
    os.kill(pid, 9)
    state = wait_job(slurm, job_id)
    output = job_output(clone, job_id)
    assert state == "FAILED" and slurm.job_field(job_id, "ExitCode") == "137:0", output
    assert slurm.job_field(job_id, "Restarts") == "0" and "requeueing" not in output
    assert (run_dir / "ranks" / "rank1.exit").read_text().strip() == "137"
