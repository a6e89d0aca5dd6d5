"""2-process runs of the `tiny` preset under every launcher: torchrun, the deepspeed launcher (one
launcher, and two "nodes" on one host with a hostfile and --no_ssh), and `accelerate launch` with
cluster/accelerate/deepspeed.yaml. Each run trains on the synthetic dataset and must finish with exit
code 0, a 2-rank global batch and a total loss that went down; torchrun and the deepspeed launcher
must give the same losses.

CI runs a subset covering every ZeRO stage (0, 2, 3), both precisions (fp32, bf16) and every
launcher at least once; the whole launcher x stage x precision matrix carries `full_matrix`
(`pytest -m full_matrix tests/pretrain/test_launchers.py`).
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.metrics import read_jsonl
from tests.conftest import REPO, free_port

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

BIN = Path(sys.executable).parent
STEPS, LOG_EVERY, BATCH = 30, 5, 8
RUN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("launchers") / "synthetic"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_tools",
            "build",
            "synthetic",
            "--samples",
            "512",
            "--seed",
            "0",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def launcher_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")
    }
    # One thread per rank under every launcher: the same arithmetic, so results can be compared bitwise.
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    return env


def commands(launcher: str, port: int, args: list[str], tmp_path: Path) -> list[list[str]]:
    """The command line(s) that start the 2-rank job (two for the two-"node" deepspeed job)."""
    module = ["pretrain", *args]
    if launcher == "torchrun":
        return [
            [
                str(BIN / "torchrun"),
                "--nproc_per_node",
                "2",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "-m",
                *module,
            ]
        ]
    if launcher == "deepspeed":
        return [[str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "--module", *module]]
    if launcher == "deepspeed-2nodes":
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
        return [
            [
                str(BIN / "deepspeed"),
                "--hostfile",
                str(hostfile),
                "--no_ssh",
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "--module",
                *module,
            ]
            for node in (0, 1)
        ]
    if launcher == "accelerate":
        return [
            [
                str(BIN / "accelerate"),
                "launch",
                "--config_file",
                str(REPO / "cluster/accelerate/deepspeed.yaml"),
                "--main_process_port",
                str(port),
                "-m",
                *module,
            ]
        ]
    raise AssertionError(launcher)


def run_job(launcher: str, zero: int, precision: str, dataset: Path, tmp_path: Path) -> tuple[list[float], str]:
    """Train STEPS steps with 2 ranks; returns the logged total losses and the combined output."""
    run_dir = tmp_path / f"run-{launcher}-z{zero}-{precision}"
    args = [
        "--config",
        "configs/tiny.yaml",
        f"data.paths=[{dataset}]",
        f"run.dir={run_dir}",
        f"zero.stage={zero}",
        f"precision={precision}",
        f"train.steps={STEPS}",
        f"train.log_every={LOG_EVERY}",
        f"data.batch_size={BATCH}",
        "checkpoint.every_steps=0",
        "checkpoint.at_end=false",
        "metrics.port=0",
        "train.lost_rank_timeout_s=300",
    ]
    if launcher == "accelerate":
        # the ZeRO file of cluster/ for this stage (the yaml names zero2.json), merged by the trainer
        args.append(f"zero.deepspeed_config={REPO / 'cluster' / 'deepspeed' / f'zero{zero}.json'}")
    logs = [tmp_path / f"{launcher}-{i}.log" for i in range(2)]
    procs = []
    for cmd, log in zip(commands(launcher, free_port(), args, tmp_path), logs):
        with open(log, "w") as out:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=launcher_env(), stdout=out, stderr=subprocess.STDOUT))
    try:
        codes = [proc.wait(timeout=RUN_TIMEOUT_S) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = "\n".join(log.read_text() for log in logs if log.exists())
    assert codes == [0] * len(procs), f"{launcher} exit codes {codes}\n{output[-4000:]}"
    assert f"global batch {2 * BATCH} = 2 ranks x {BATCH}" in output, output[-4000:]
    assert f"ZeRO {zero}, {precision}" in output, output[-4000:]
    assert "terminate called" not in output
    records = read_jsonl(run_dir)
    assert [r["step"] for r in records] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    losses = [r["loss/total"] for r in records]
    assert all(isinstance(loss, float) and math.isfinite(loss) and loss > 0 for loss in losses), losses
    return losses, output


def assert_learns(losses: list[float]) -> None:
    """The total loss at the end is below its start (averages of the first and last two records)."""
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses


def test_torchrun_and_deepspeed_launcher_agree(dataset, tmp_path):
    torchrun, _ = run_job("torchrun", 2, "fp32", dataset, tmp_path)
    deepspeed, _ = run_job("deepspeed", 2, "fp32", dataset, tmp_path)
    assert_learns(torchrun)
    assert deepspeed == pytest.approx(torchrun, rel=1e-6, abs=1e-7)


LAUNCHERS = ("torchrun", "deepspeed", "deepspeed-2nodes", "accelerate")
CI_SUBSET = {  # with the agreement test above (torchrun and deepspeed, ZeRO 2, fp32)
    ("torchrun", 0, "bf16"),
    ("deepspeed-2nodes", 3, "fp32"),
    ("deepspeed", 3, "bf16"),
    ("accelerate", 2, "fp32"),
}


def matrix():
    for launcher, zero, precision in itertools.product(LAUNCHERS, (0, 2, 3), ("fp32", "bf16")):
        marks = () if (launcher, zero, precision) in CI_SUBSET else (pytest.mark.full_matrix,)
        yield pytest.param(launcher, zero, precision, marks=marks, id=f"{launcher}-zero{zero}-{precision}")


@pytest.mark.parametrize("launcher, zero, precision", list(matrix()))
def test_two_ranks_train_under_every_launcher(launcher, zero, precision, dataset, tmp_path):
    losses, _ = run_job(launcher, zero, precision, dataset, tmp_path)
    assert_learns(losses)


def test_accelerate_uses_the_zero_file_its_yaml_names(dataset, tmp_path):
    """No zero.deepspeed_config on the command line: cluster/accelerate/deepspeed.yaml names
    cluster/deepspeed/zero2.json, accelerate exports it (ACCELERATE_DEEPSPEED_CONFIG_FILE) and the
    trainer merges it, so a preset saying ZeRO 0 trains with ZeRO 2 partitions."""
    run_dir = tmp_path / "run"
    args = [
        "--config",
        "configs/tiny.yaml",
        f"data.paths=[{dataset}]",
        f"run.dir={run_dir}",
        "zero.stage=0",
        "train.steps=4",
        f"data.batch_size={BATCH}",
        "metrics.enabled=false",
        "train.lost_rank_timeout_s=300",
    ]
    [cmd] = commands("accelerate", free_port(), args, tmp_path)
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    import yaml

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["zero"]["deepspeed_config"] == "cluster/deepspeed/zero2.json"
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    partitions = sorted(p.name for p in (run_dir / "checkpoints" / tag).glob("*zero_pp_rank_*optim_states.pt"))
    assert len(partitions) == 2, partitions  # one optimizer partition per rank: ZeRO >= 1, not the preset's 0
