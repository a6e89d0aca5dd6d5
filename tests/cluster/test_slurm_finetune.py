"""cluster/slurm/finetune.sbatch against the real local Slurm (tests/cluster/slurm_cluster.py).

The README's finetuning command line, exactly (tests/cluster/readme_commands.py), typed in a fresh
clone without logs/: its INIT is a one-process tiny pretraining run at the README's path (started
directly: the 2-node pretraining job is test_slurm.py's), its data and EVAL_DATA small synthetic sets
at the README's paths. The template finetunes as a 2-node x 1-task job and then evaluates the finished
run with one task: the job completes, each rank ran on its own node, the finetuning checkpoint exists,
and `<run>/eval/<name>/report.json` and report.md hold recall figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.cluster.readme_commands import fresh_clone, sbatch_command
from tests.cluster.slurm_cluster import NODES
from tests.cluster.test_slurm import JOB_TIMEOUT_S, job_output, readme_env, submitted_job_id
from tests.conftest import REPO
from tests.pretrain.runs import build_synthetic, env_for, latest_tag

pytestmark = [pytest.mark.cluster, pytest.mark.multiprocess, pytest.mark.slow]

TEMPLATE = REPO / "cluster" / "slurm" / "finetune.sbatch"


def test_finetune_job_trains_from_the_pretraining_run_and_writes_the_report(slurm, tmp_path):
    command = sbatch_command("finetune.sbatch")
    clone = fresh_clone(tmp_path / "relalign")
    data = next(a for a in command.argv if a.startswith("data.paths=")).split("=", 1)[1].strip("[]")
    steps = int(next(a for a in command.argv if a.startswith("train.steps=")).split("=", 1)[1])
    build_synthetic(clone / data, samples=48)
    eval_data = build_synthetic(clone / command.env["EVAL_DATA"], samples=32)
    pretrained = command.env["INIT"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain",
            "--config",
            command.env["CONFIG"],
            f"data.paths=[{data}]",
            f"run.dir={pretrained}",
            "metrics.enabled=false",
            "train.steps=2",
            "data.batch_size=8",
        ],
        cwd=clone,
        env={**env_for(), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    run_dir = clone / command.env["RUN_DIR"]
    start = time.monotonic()
    proc = subprocess.run(
        command.argv, cwd=clone, env=readme_env(slurm, command), capture_output=True, text=True, timeout=JOB_TIMEOUT_S
    )
    print(f"finetune Slurm job: {time.monotonic() - start:.1f} s")
    job_id = submitted_job_id(proc.stdout)
    output = job_output(clone, job_id)
    assert proc.returncode == 0, proc.stderr + output
    assert slurm.job_field(job_id, "JobState") == "COMPLETED" and slurm.job_field(job_id, "Restarts") == "0"
    assert f"finetune.init={pretrained}" in output and "evaluating" in output, output
    assert (clone / f"relalign-finetune-{job_id}.out").exists() and not (clone / "logs").exists()
    ranks = {int(p.stem[4:]): json.loads(p.read_text()) for p in (run_dir / "ranks").glob("rank*.json")}
    assert sorted(ranks) == [0, 1] and {r["slurmd_nodename"] for r in ranks.values()} == set(NODES)
    assert latest_tag(run_dir) == f"step{steps:08d}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "loss/hinge" in next(r for r in records if r.get("kind") == "train")  # the finetuning recipe ran

    report_dir = run_dir / "eval" / f"{eval_data.name}-rerank-k{command.env['EVAL_K']}"
    report = json.loads((report_dir / "report.json").read_text())
    assert report["data"] == command.env["EVAL_DATA"] and f"step{steps:08d}" in report["weights"]
    got = report["recall"]
    for direction, count in (("i2t", report["images"]), ("t2i", report["captions"])):
        for k in (1, 5, 10):  # a share of the images (i2t) or captions (t2i): a whole number of hits each
            hits = got[f"{direction}@{k}"] * count
            assert hits == pytest.approx(round(hits), abs=1e-6) and 0 <= round(hits) <= count, got
            if direction == "t2i" and k == 10 and report["images"] <= 10:
                assert got["t2i@10"] == 1.0, got  # ten ranks cover the whole image gallery
        assert got[f"{direction}@1"] <= got[f"{direction}@5"] <= got[f"{direction}@10"], got
    six = [got[f"{d}@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert got["mean"] == pytest.approx(sum(six) / 6) and got["rsum"] == pytest.approx(100 * sum(six))
    markdown = (report_dir / "report.md").read_text()
    assert "| direction | R@1 | R@5 | R@10 |" in markdown and "rsum" in markdown


def test_finetune_dry_run_prints_training_and_evaluation_and_needs_init(tmp_path):
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "CONFIG": "configs/tiny.yaml",
        "RUN_DIR": "runs/ft",
        "INIT": "runs/pre",
        "EVAL_DATA": "data/test",
        "EVAL_K": "8",
    }
    proc = subprocess.run(
        ["bash", str(TEMPLATE), "train.steps=3"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    train, evaluate = proc.stdout.splitlines()[1], proc.stdout.splitlines()[3]
    assert train.strip() == (
        "python -m finetune --config configs/tiny.yaml --init runs/pre --resume auto "
        "run.dir=runs/ft metrics.host=0.0.0.0 metrics.port=9400 train.steps=3"
    )
    assert evaluate.strip() == "python -m finetune evaluate runs/ft --data data/test --mode rerank --k 8 --no-progress"
    assert not (tmp_path / "logs").exists()
    del env["INIT"]
    proc = subprocess.run(["bash", str(TEMPLATE)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.startswith("finetune.sbatch: INIT is not set"), proc.stderr
