"""The deepspeed launcher as people use it on several machines: its default pdsh runner over ssh.

A throwaway sshd listens on 127.0.0.2 and 127.0.0.3 (tests/cluster/sshd_server.py); a hostfile names
them with 1 slot each, and `deepspeed --hostfile ... --ssh_port 2222 --module pretrain` must train the
tiny preset with one rank on each "node" (pdsh prefixes every line with the host it came from).
Settings the remote shells need travel in the file DS_ENV_FILE names, as the launcher documents.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.metrics import read_jsonl
from tests.cluster.sshd_server import HOSTS
from tests.conftest import REPO, free_port
from tests.pretrain.runs import build_synthetic, latest_tag

pytestmark = [pytest.mark.cluster, pytest.mark.multiprocess, pytest.mark.slow]

STEPS, BATCH = 10, 4


def test_deepspeed_launcher_trains_on_two_hosts_over_ssh(sshd, tmp_path):
    data = build_synthetic(tmp_path / "synthetic", samples=128)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{host} slots=1\n" for host in HOSTS))
    ds_env = tmp_path / "deepspeed_env"  # exported on every node by the launcher
    ds_env.write_text(
        "DS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1\nHF_HUB_OFFLINE=1\nTRANSFORMERS_OFFLINE=1\n"
        f"TORCH_EXTENSIONS_DIR={os.environ['TORCH_EXTENSIONS_DIR']}\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")
    }
    env.update(DS_ENV_FILE=str(ds_env), PYTHONUNBUFFERED="1")
    run_dir = tmp_path / "run"
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--hostfile",
        str(hostfile),
        "--ssh_port",
        str(sshd.port),
        "--master_addr",
        HOSTS[0],
        "--master_port",
        str(free_port()),
        "--module",
        "pretrain",
        "--config",
        "configs/tiny.yaml",
        f"data.paths=[{data}]",
        f"run.dir={run_dir}",
        f"data.batch_size={BATCH}",
        f"train.steps={STEPS}",
        "train.log_every=5",
        "metrics.enabled=false",
        "train.lost_rank_timeout_s=120",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:] + sshd.log()
    assert f"global batch {2 * BATCH} = 2 ranks x {BATCH}" in output, output[-5000:]
    # one launcher per host, each reached over ssh: pdsh prefixes their lines with the host
    for host in HOSTS:
        assert f"{host}: " in output, output[-5000:]
    assert sshd.log().count("Accepted publickey") >= 2
    assert [r["step"] for r in read_jsonl(run_dir)] == [5, 10]
    assert (run_dir / "checkpoints" / latest_tag(run_dir)).is_dir()
