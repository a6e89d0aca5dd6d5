"""The job layout derived from each launcher's environment (torchrun, deepspeed, accelerate, Slurm, none)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from data_tools.errors import UserError
from pretrain import dist_env
from pretrain.dist_env import DistEnv, detect, expand_hostlist, expand_tasks_per_node, first_host
from tests.conftest import REPO


def test_torchrun_variables():
    env = detect(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.5",
            "MASTER_PORT": "29611",
            "TORCHELASTIC_RUN_ID": "x",
        }
    )
    assert env == DistEnv(3, 8, 1, 2, "10.0.0.5", 29611, "torchrun")


def test_deepspeed_launcher_variables():
    # deepspeed's launch.py sets LOCAL_SIZE, CROSS_RANK and CROSS_SIZE, not LOCAL_WORLD_SIZE.
    env = detect(
        {
            "RANK": "1",
            "WORLD_SIZE": "2",
            "LOCAL_RANK": "0",
            "LOCAL_SIZE": "1",
            "CROSS_RANK": "1",
            "CROSS_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29700",
        }
    )
    assert env == DistEnv(1, 2, 0, 1, "127.0.0.1", 29700, "deepspeed")


def test_accelerate_takes_precedence_over_the_torchrun_it_starts():
    env = detect(
        {
            "RANK": "0",
            "WORLD_SIZE": "2",
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "h",
            "MASTER_PORT": "1234",
            "TORCHELASTIC_RUN_ID": "x",
            "ACCELERATE_USE_DEEPSPEED": "true",
        }
    )
    assert env.launcher == "accelerate" and (env.rank, env.world_size, env.master_port) == (0, 2, 1234)


def test_slurm_two_nodes_uneven_tasks():
    environ = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "7",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2",
        "SLURM_TASKS_PER_NODE": "2(x3),1",
        "SLURM_JOB_NODELIST": "node[01-03],gpu7",
        "SLURM_JOB_ID": "123456",
    }
    env = detect(environ)
    assert env == DistEnv(5, 7, 1, 2, "node01", 15000 + 123456 % 20000, "slurm")
    assert detect({**environ, "SLURM_NODEID": "3", "SLURM_LOCALID": "0", "SLURM_PROCID": "6"}).local_world_size == 1


def test_slurm_ntasks_per_node_and_explicit_master_win():
    env = detect(
        {
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "4",
            "SLURM_LOCALID": "0",
            "SLURM_NTASKS_PER_NODE": "4",
            "SLURM_TASKS_PER_NODE": "4",
            "SLURM_JOB_NODELIST": "a1",
            "SLURM_JOB_ID": "7",
            "MASTER_ADDR": "login2",
            "MASTER_PORT": "40000",
        }
    )
    assert (env.local_world_size, env.master_addr, env.master_port) == (4, "login2", 40000)


def test_every_task_of_a_slurm_job_derives_the_same_master():
    base = {
        "SLURM_NTASKS": "4",
        "SLURM_TASKS_PER_NODE": "2(x2)",
        "SLURM_JOB_NODELIST": "gpu[100-101]",
        "SLURM_JOB_ID": "98765",
    }
    envs = [
        detect({**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % 2), "SLURM_NODEID": str(r // 2)})
        for r in range(4)
    ]
    assert {(e.master_addr, e.master_port) for e in envs} == {("gpu100", 15000 + 98765 % 20000)}
    assert [e.rank for e in envs] == [0, 1, 2, 3] and [e.local_rank for e in envs] == [0, 1, 0, 1]


def test_launcher_variables_win_over_slurm():
    # torchrun started inside an sbatch allocation: RANK from torchrun, not SLURM_PROCID.
    env = detect(
        {
            "RANK": "1",
            "WORLD_SIZE": "2",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500",
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "1",
        }
    )
    assert (env.launcher, env.rank, env.world_size) == ("torchrun", 1, 2)


def test_single_process_gets_a_free_local_port():
    env = detect({})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.launcher) == (0, 1, 0, 1, "single")
    assert env.master_addr == "127.0.0.1" and 1024 <= env.master_port < 65536
    assert detect({"MASTER_PORT": "31000"}).master_port == 31000


@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("node[01-03],gpu7", ["node01", "node02", "node03", "gpu7"]),
        ("gpu7", ["gpu7"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("a[1,3-4]-ib,b", ["a1-ib", "a3-ib", "a4-ib", "b"]),
        ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
    ],
)
def test_hostlist_expansion(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts
    assert first_host(hostlist) == hosts[0]


def test_tasks_per_node_expansion():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]


@pytest.mark.parametrize(
    "environ, needle",
    [
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "rank 2 is outside world size 2"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        (
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "2(x", "SLURM_JOB_ID": "1"},
            "SLURM_TASKS_PER_NODE",
        ),
        (
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "node[01-", "SLURM_JOB_ID": "1"},
            "unbalanced",
        ),
        ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "70000"}, "not a TCP port"),
    ],
)
def test_contradictory_environments_are_user_errors(environ, needle):
    with pytest.raises(UserError, match=needle):
        detect(environ)


def test_record_rank_host_names_the_slurm_node_of_each_rank(tmp_path):
    import json
    import socket

    path = dist_env.record_rank_host(
        tmp_path, {"SLURM_PROCID": "1", "SLURMD_NODENAME": "n2", "SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "2"}
    )
    assert path == str(tmp_path / "ranks" / "rank1.json")
    assert json.loads((tmp_path / "ranks" / "rank1.json").read_text()) == {
        "rank": 1,
        "hostname": socket.gethostname(),
        "slurmd_nodename": "n2",
        "slurm_job_id": "7",
        "slurm_restart_count": 2,
    }
    # RANK (torchrun, deepspeed) wins over SLURM_PROCID; outside Slurm the node is null
    dist_env.record_rank_host(tmp_path, {"RANK": "0", "SLURM_PROCID": "5"})
    assert json.loads((tmp_path / "ranks" / "rank0.json").read_text())["slurmd_nodename"] is None
    with pytest.raises(UserError, match="rank 'x'"):
        dist_env.record_rank_host(tmp_path, {"RANK": "x"})


def test_accelerate_deepspeed_config_file_is_found_and_checked(tmp_path):
    config = tmp_path / "zero2.json"
    config.write_text("{}")
    assert dist_env.launcher_deepspeed_config({"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(config)}) == str(config)
    assert dist_env.launcher_deepspeed_config({"ACCELERATE_DEEPSPEED_CONFIG_FILE": "None"}) is None
    assert dist_env.launcher_deepspeed_config({}) is None
    with pytest.raises(UserError, match="ACCELERATE_DEEPSPEED_CONFIG_FILE='/nowhere.json' is not a file"):
        dist_env.launcher_deepspeed_config({"ACCELERATE_DEEPSPEED_CONFIG_FILE": "/nowhere.json"})


def test_backend_is_gloo_on_cpu(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert dist_env.backend() == "gloo"


@pytest.mark.multiprocess
def test_single_process_group_starts_without_a_launcher_and_exits_cleanly(tmp_path):
    """A plain `python` process: no MPI lookup, a one-rank gloo group, shutdown, exit code kept."""
    code = (
        "import torch.distributed as dist\n"
        "from pretrain import dist_env\n"
        "env = dist_env.detect()\n"
        "dist_env.init_distributed(env, timeout_s=60)\n"
        "assert dist.get_world_size() == 1 and dist.get_rank() == 0 and dist.get_backend() == 'gloo'\n"
        "import atexit; atexit.register(lambda: open(%r, 'w').write('atexit ran'))\n"
        "dist_env.shutdown()\n"
        "assert not dist.is_initialized()\n"
        "print('group closed', flush=True)\n"
        "dist_env.exit_process(7)\n" % str(tmp_path / "atexit.txt")
    )
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=environ, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 7, proc.stderr[-2000:]
    assert "group closed" in proc.stdout
    assert (tmp_path / "atexit.txt").read_text() == "atexit ran"


@pytest.mark.parametrize(
    ("local_rank", "visible", "device"),
    [(0, 8, 0), (3, 8, 3), (1, 1, 0), (3, 1, 0), (3, 2, 1)],  # every GPU visible; Slurm's per-task binding
)
def test_the_cuda_device_follows_what_the_task_sees(local_rank: int, visible: int, device: int) -> None:
    """srun --gpus-per-task=1 shows each task one GPU: local rank 1 must use cuda:0, not a cuda:1 it lacks."""
    assert dist_env.cuda_device_index(local_rank, visible) == device


def test_no_visible_cuda_device_is_one_line(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UserError, match="no CUDA device is visible to local rank 2.*DS_ACCELERATOR=cpu"):
        dist_env.cuda_device_index(2, 0)
