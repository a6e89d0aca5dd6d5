"""A rank that dies makes the others exit with ExitCode.LOST_RANK naming it: real 2-process gloo jobs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from data_tools.errors import ExitCode
from tests.conftest import REPO

pytestmark = pytest.mark.multiprocess

# One rank of a 2-process gloo job with the watchdog running. `VICTIM` SIGKILLs itself after the
# first collective; the survivor then blocks in collectives (gloo) or in a store wait (a pure hang)
# that only the watchdog can end. The process-group timeout is far beyond the test's own timeout.
WORKER = r"""
import datetime, os, signal, sys, time
import torch, torch.distributed as dist
from pretrain import dist_env
from pretrain.watchdog import RankWatchdog

scenario, victim, timeout_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
env = dist_env.detect()
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=900))
watchdog = RankWatchdog(env, timeout_s, on_lost=lambda msg: print("on_lost called", flush=True))
watchdog.start()
tensor = torch.ones(4)
dist.all_reduce(tensor)
assert tensor.tolist() == [2.0] * 4
print(f"rank {env.rank} ready", flush=True)
if scenario == "finish":
    # ranks end at different moments: the early one must not be reported as lost
    if env.rank == 0:
        time.sleep(4 * timeout_s)
    watchdog.stop()
    print(f"rank {env.rank} done", flush=True)
    dist_env.exit_process(0)
if env.rank == victim:
    os.kill(os.getpid(), signal.SIGKILL)
if scenario == "hang":
    store = dist.TCPStore(env.master_addr, env.master_port, is_master=False, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=900))
    store.wait(["never-set"])
else:
    try:
        while True:
            dist.all_reduce(tensor)
    except RuntimeError as err:  # gloo noticed the closed connection first: let the watchdog name the rank
        watchdog.on_comm_error(err)
print("unreachable", flush=True)
"""


def run_job(port: int, scenario: str, victim: int, timeout_s: float = 3.0) -> list[subprocess.CompletedProcess]:
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, scenario, str(victim), str(timeout_s)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=240)  # far below the 900 s process-group timeout
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"a rank hung: the watchdog did not end it ({scenario}, victim {victim})")
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


@pytest.mark.parametrize("scenario, victim", [("hang", 1), ("collective", 1), ("collective", 0), ("hang", 0)])
def test_survivor_exits_with_lost_rank_naming_the_dead_one(port, scenario, victim):
    results = run_job(port, scenario, victim)
    dead, survivor = results[victim], results[1 - victim]
    assert dead.returncode == -9
    assert survivor.returncode == ExitCode.LOST_RANK, survivor.stderr[-3000:]
    assert f"rank {1 - victim} ready" in survivor.stdout and "unreachable" not in survivor.stdout
    lines = [line for line in survivor.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1 and f"rank {victim} of 2 is lost" in lines[0], survivor.stderr[-3000:]
    assert "watchdog timeout 3 s" in lines[0] and f"exits with code {int(ExitCode.LOST_RANK)}" in lines[0]
    assert "on_lost called" in survivor.stdout


def test_ranks_finishing_at_different_times_are_not_reported(port):
    results = run_job(port, "finish", victim=-1, timeout_s=1.0)
    for rank, result in enumerate(results):
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"rank {rank} done" in result.stdout and "is lost" not in result.stderr
