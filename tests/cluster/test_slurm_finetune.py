"""cluster/slurm/finetune.sbatch against the real local Slurm (tests/cluster/slurm_cluster.py).

A one-process tiny pretraining run (started directly: the 2-node pretraining job is test_slurm.py's)
is the INIT; the template finetunes it as a 2-node x 1-task job and then evaluates the finished run
on a 32-scene eval set with one task: the job completes, each rank ran on its own node, the
finetuning checkpoint exists, and `<run>/eval/<name>/report.json` and report.md hold recall figures.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.slurm_cluster import NODES
from tests.cluster.test_slurm import JOB_TIMEOUT_S, job_env, job_output, submit
from tests.conftest import REPO
from tests.pretrain.runs import build_synthetic, env_for, latest_tag

pytestmark = [pytest.mark.cluster, pytest.mark.multiprocess, pytest.mark.slow]

TEMPLATE = REPO / "cluster" / "slurm" / "finetune.sbatch"
STEPS = 4
SETTINGS = ("finetune.candidates=6", "finetune.hard=2", f"train.steps={STEPS}", "data.batch_size=4",
            "metrics.enabled=false", "checkpoint.every_steps=0", "train.lost_rank_timeout_s=120")


def test_finetune_job_trains_from_the_pretraining_run_and_writes_the_report(slurm, tmp_path):
    data = build_synthetic(tmp_path / "data", samples=48)
    eval_data = build_synthetic(tmp_path / "eval-data", samples=32)
    pretrained = tmp_path / "pretrain"
    proc = subprocess.run([sys.executable, "-m", "pretrain", "--config", "configs/tiny.yaml", f"data.paths=[{data}]",
                           f"run.dir={pretrained}", "metrics.enabled=false", "train.steps=2", "data.batch_size=8"],
                          cwd=REPO, env=env_for(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run_dir = tmp_path / "run"
    env = job_env(RUN_DIR=str(run_dir), INIT=str(pretrained), EVAL_DATA=str(eval_data), EVAL_K="8")
    start = time.monotonic()
    job_id, code = submit(slurm, tmp_path, env, [f"data.paths=[{data}]", *SETTINGS], wait=True, template=TEMPLATE)
    print(f"finetune Slurm job: {time.monotonic() - start:.1f} s")
    output = job_output(tmp_path, job_id)
    assert code == 0, output
    assert slurm.job_field(job_id, "JobState") == "COMPLETED" and slurm.job_field(job_id, "Restarts") == "0"
    assert f"finetune.init={pretrained}" in output and "evaluating" in output, output
    ranks = {int(p.stem[4:]): json.loads(p.read_text()) for p in (run_dir / "ranks").glob("rank*.json")}
    assert sorted(ranks) == [0, 1] and {r["slurmd_nodename"] for r in ranks.values()} == set(NODES)
    assert latest_tag(run_dir) == f"step{STEPS:08d}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "loss/hinge" in next(r for r in records if r.get("kind") == "train")  # the finetuning recipe ran

    report_dir = run_dir / "eval" / "eval-data-rerank-k8"
    report = json.loads((report_dir / "report.json").read_text())
    assert report["data"] == str(eval_data) and f"step{STEPS:08d}" in report["weights"]
    for key in ("i2t@1", "i2t@10", "t2i@1", "t2i@10"):
        assert 0.0 <= report["recall"][key] <= 1.0, report["recall"]
    assert report["recall"]["t2i@10"] >= report["recall"]["t2i@1"]
    markdown = (report_dir / "report.md").read_text()
    assert "| direction | R@1 | R@5 | R@10 |" in markdown and "rsum" in markdown


def test_finetune_dry_run_prints_training_and_evaluation_and_needs_init(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "CONFIG": "configs/tiny.yaml", "RUN_DIR": "runs/ft", "INIT": "runs/pre",
           "EVAL_DATA": "data/test", "EVAL_K": "8"}
    proc = subprocess.run(["bash", str(TEMPLATE), "train.steps=3"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    train, evaluate = proc.stdout.splitlines()[1], proc.stdout.splitlines()[3]
    assert train.strip() == ("python -m finetune --config configs/tiny.yaml --init runs/pre --resume auto "
                             "run.dir=runs/ft metrics.host=0.0.0.0 metrics.port=9400 train.steps=3")
    assert evaluate.strip() == "python -m finetune evaluate runs/ft --data data/test --mode rerank --k 8 --no-progress"
    assert not (tmp_path / "logs").exists()
    del env["INIT"]
    proc = subprocess.run(["bash", str(TEMPLATE)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.startswith("finetune.sbatch: INIT is not set"), proc.stderr
