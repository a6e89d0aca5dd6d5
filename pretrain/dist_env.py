"""Where this process sits in the job, whichever launcher started it, and the process group's life.

`detect` reads the environment of torchrun, the deepspeed launcher, `accelerate launch`, Slurm's
`srun` or nothing (a plain `python -m pretrain`) into one `DistEnv`, so the trainer runs unchanged
under all of them. `init_distributed` exports that view as the `env://` variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) before DeepSpeed starts the process group: without them
DeepSpeed would go looking for MPI. `shutdown` and `exit_process` end the job without the exit-time
abort described below.

Why `exit_process` ends with `os._exit`: after `destroy_process_group()` has returned, a few percent
of 2-process runs died at interpreter teardown with "terminate called without an active exception"
(SIGABRT). That message is C++'s `std::terminate` from destroying a still-joinable `std::thread`:
c10d's store and gloo's background threads are torn down by static destructors racing the
interpreter's own finalisation. By then all useful work is done and flushed, so the clean ending is
to flush what Python still buffers, run the `atexit` handlers ourselves, and leave with `os._exit`,
which skips the C++ static destructors altogether. `bench/bench_shutdown.py` measures both endings.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from typing import Mapping, NoReturn

import hostlist

from data_tools.errors import UserError, atomic_write_text

LAUNCHERS = ("single", "torchrun", "deepspeed", "slurm", "accelerate")

SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 20000
"""Under Slurm without MASTER_PORT, the port is SLURM_PORT_BASE + SLURM_JOB_ID % SLURM_PORT_SPAN:
every task of a job derives the same port, and two jobs sharing a node rarely collide."""


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, as the launcher described it."""

    rank: int
    """Global rank, 0 .. world_size - 1."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank on this node (selects the GPU and the metrics port)."""
    local_world_size: int
    """Processes on this node."""
    master_addr: str
    """Host of rank 0's rendezvous store."""
    master_port: int
    """Port of the rendezvous store."""
    launcher: str
    """single | torchrun | deepspeed | slurm | accelerate."""


def detect(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """The job layout from the launcher's variables; raises UserError when they contradict each other.

    Precedence: accelerate (it starts torchrun underneath, so it is checked first), the deepspeed
    launcher, torchrun, any other `env://` launcher that set RANK, then Slurm, then single process.
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        if any(k.startswith("ACCELERATE_") for k in environ):
            launcher = "accelerate"
        elif "CROSS_RANK" in environ or "LOCAL_SIZE" in environ:
            launcher = "deepspeed"
        else:
            launcher = "torchrun"
        env = _from_env_vars(environ, launcher)
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        env = _from_slurm(environ)
    elif any(k.startswith("ACCELERATE_") for k in environ):
        env = _single(environ, "accelerate")  # `accelerate launch` with one process sets no RANK
    else:
        env = _single(environ, "single")
    _check(env)
    return env


def launcher_deepspeed_config(environ: Mapping[str, str] = os.environ) -> str | None:
    """The DeepSpeed JSON a launcher asked for, if any: `accelerate launch` with a DeepSpeed config
    exports its `deepspeed_config_file` as ACCELERATE_DEEPSPEED_CONFIG_FILE (cluster/accelerate/
    deepspeed.yaml names cluster/deepspeed/zero2.json). The trainer merges it like
    `zero.deepspeed_config` when that is not set, so the launcher's ZeRO settings take effect."""
    path = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "").strip()
    if not path or path.lower() == "none":
        return None
    if not os.path.isfile(path):
        raise UserError(f"environment: ACCELERATE_DEEPSPEED_CONFIG_FILE={path!r} is not a file")
    return path


def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if value is None:
        if default is None:
            raise UserError(f"environment: {name} is not set; the launcher must set it with RANK and WORLD_SIZE")
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment: {name}={value!r} is not an integer") from None


def _port(environ: Mapping[str, str], default: int | None) -> int:
    if "MASTER_PORT" in environ:
        return _int(environ, "MASTER_PORT")
    return default if default is not None else free_port()


def _from_env_vars(environ: Mapping[str, str], launcher: str) -> DistEnv:
    """torchrun, deepspeed and accelerate: the `env://` variables are already there."""
    world_size = _int(environ, "WORLD_SIZE")
    local_rank = _int(environ, "LOCAL_RANK", 0)
    # torchrun: LOCAL_WORLD_SIZE; deepspeed launcher: LOCAL_SIZE; otherwise assume one node.
    local_world = _int(environ, "LOCAL_WORLD_SIZE", _int(environ, "LOCAL_SIZE", world_size))
    return DistEnv(
        rank=_int(environ, "RANK"),
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world,
        master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_port(environ, 29500 if world_size > 1 else None),
        launcher=launcher,
    )


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    """`srun python -m pretrain`: one task per process, layout from SLURM_* variables."""
    node_id = _int(environ, "SLURM_NODEID", 0)
    if "SLURM_NTASKS_PER_NODE" in environ:
        local_world = _int(environ, "SLURM_NTASKS_PER_NODE")
    elif "SLURM_TASKS_PER_NODE" in environ:
        per_node = expand_tasks_per_node(environ["SLURM_TASKS_PER_NODE"])
        if node_id >= len(per_node):
            raise UserError(
                f"environment: SLURM_NODEID={node_id} is outside SLURM_TASKS_PER_NODE="
                f"{environ['SLURM_TASKS_PER_NODE']!r} ({len(per_node)} nodes)"
            )
        local_world = per_node[node_id]
    else:
        local_world = 1
    if "MASTER_ADDR" in environ:
        master_addr = environ["MASTER_ADDR"]
    elif "SLURM_JOB_NODELIST" in environ or "SLURM_NODELIST" in environ:
        master_addr = first_host(environ.get("SLURM_JOB_NODELIST") or environ["SLURM_NODELIST"])
    else:
        master_addr = "127.0.0.1"
    job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    default_port = SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN if job_id and job_id.isdigit() else 29500
    return DistEnv(
        rank=_int(environ, "SLURM_PROCID"),
        world_size=_int(environ, "SLURM_NTASKS"),
        local_rank=_int(environ, "SLURM_LOCALID", 0),
        local_world_size=local_world,
        master_addr=master_addr,
        master_port=_port(environ, default_port),
        launcher="slurm",
    )


def _single(environ: Mapping[str, str], launcher: str) -> DistEnv:
    """No launcher: a one-process group on this host, on a free port unless MASTER_PORT is set."""
    return DistEnv(0, 1, 0, 1, environ.get("MASTER_ADDR", "127.0.0.1"), _port(environ, None), launcher)


def _check(env: DistEnv) -> None:
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise UserError(f"environment: rank {env.rank} is outside world size {env.world_size}")
    if env.local_world_size < 1 or not 0 <= env.local_rank < env.local_world_size:
        raise UserError(f"environment: local rank {env.local_rank} is outside local world size {env.local_world_size}")
    if not 0 < env.master_port < 65536:
        raise UserError(f"environment: MASTER_PORT={env.master_port} is not a TCP port (1..65535)")


def record_rank_host(run_dir: str | os.PathLike, environ: Mapping[str, str] = os.environ) -> str:
    """Write `<run_dir>/ranks/rank<r>.json`: where this rank runs (host name, Slurm node, job, restart).

    Two Slurm "nodes" may share one machine (the cluster tests do) and a requeued job may land on
    other nodes, so the host name alone does not say which allocation a rank used: SLURMD_NODENAME
    does. cluster/slurm/pretrain.sbatch calls this once per task before the trainer starts; the
    rank is RANK, else SLURM_PROCID, else 0. Returns the file's path.
    """
    rank = environ.get("RANK") or environ.get("SLURM_PROCID") or "0"
    if not rank.isdigit():
        raise UserError(f"environment: rank {rank!r} (RANK/SLURM_PROCID) is not an integer")
    record = {
        "rank": int(rank),
        "hostname": socket.gethostname(),
        "slurmd_nodename": environ.get("SLURMD_NODENAME"),
        "slurm_job_id": environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(environ.get("SLURM_RESTART_COUNT") or 0),
    }
    path = os.path.join(os.fspath(run_dir), "ranks", f"rank{int(rank)}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(record, sort_keys=True) + "\n")
    return path


# --- Slurm list syntax ---------------------------------------------------------------------------
def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE "2(x3),1" -> [2, 2, 2, 1] (tasks on each node, in node order)."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise UserError(f"environment: SLURM_TASKS_PER_NODE={spec!r} is not of the form '2(x3),1'")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def expand_hostlist(nodelist: str) -> list[str]:
    """A Slurm hostlist "node[01-03,7],gpu7,r[1-2]-n[1-2]" -> every host name, in order, zero
    padding kept; python-hostlist does the parsing (so deriving MASTER_ADDR needs no `scontrol`)."""
    try:
        hosts = hostlist.expand_hostlist(nodelist)
    except hostlist.BadHostlist as err:
        raise UserError(f"environment: SLURM_JOB_NODELIST={nodelist!r}: {err}") from None
    if not hosts:
        raise UserError(f"environment: SLURM_JOB_NODELIST={nodelist!r} names no host")
    return hosts


def first_host(hostlist: str) -> str:
    """The first host of a Slurm hostlist: `scontrol show hostnames` where present, else python-hostlist."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run(
                [scontrol, "show", "hostnames", hostlist], capture_output=True, text=True, timeout=10, check=True
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass  # fall back to python-hostlist
    return expand_hostlist(hostlist)[0]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# --- process group -------------------------------------------------------------------------------
def backend() -> str:
    """gloo on CPU (DS_ACCELERATOR=cpu or no CUDA), nccl on CUDA."""
    import torch

    if os.environ.get("DS_ACCELERATOR", "").lower() == "cpu" or not torch.cuda.is_available():
        return "gloo"
    return "nccl"


def export(env: DistEnv) -> None:
    """Write `env` as the `env://` variables that torch and DeepSpeed read."""
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )


def cuda_device_index(local_rank: int, visible: int) -> int:
    """This process's CUDA device among the `visible` ones. Launchers that show every task all of the
    node's GPUs (torchrun, deepspeed, srun --gpus-per-node) want the local rank; Slurm's per-task binding
    (--gpus-per-task=1, --gpu-bind) shows each task only its own GPU, where local rank 1 has no cuda:1 and
    the task's device is cuda:0. So: the local rank modulo the visible count."""
    if visible < 1:
        raise UserError(
            f"environment: no CUDA device is visible to local rank {local_rank} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}); "
            "run on CPU with DS_ACCELERATOR=cpu or give every task a GPU"
        )
    return local_rank % visible


def init_distributed(env: DistEnv, timeout_s: float = 300) -> None:
    """Start the process group (through DeepSpeed, so `deepspeed.comm` knows it) for `env`.

    Exports the `env://` variables first, so DeepSpeed never falls back to MPI discovery; pins the
    CUDA device (`cuda_device_index`) on GPU machines. Idempotent: a second call is a no-op.
    """
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    export(env)
    name = backend()
    if name == "nccl":
        index = cuda_device_index(env.local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        os.environ["LOCAL_RANK"] = str(index)  # DeepSpeed's engine sets its device from LOCAL_RANK
    import deepspeed

    deepspeed.init_distributed(
        dist_backend=name,
        auto_mpi_discovery=False,
        verbose=False,
        timeout=datetime.timedelta(seconds=timeout_s),
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
    )


def shutdown(barrier: bool = True) -> None:
    """Tear the process group down so no rank leaves while another still talks to it.

    A barrier first (skipped with `barrier=False`, e.g. when a rank is known lost and would never
    arrive), then `destroy_process_group`. Safe to call when no group exists. Finish the process
    with `exit_process` afterwards: see the module docstring for why a normal interpreter exit is
    not enough.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier and dist.get_world_size() > 1:
        try:
            dist.barrier()
        except RuntimeError as err:  # a peer already gone: nothing to wait for
            logging.getLogger(__name__).warning("shutdown barrier failed: %s", err)
    dist.destroy_process_group()


def exit_process(code: int = 0) -> NoReturn:
    """End the process with `code` after flushing Python's state, skipping C++ static destructors.

    Runs the `atexit` handlers (e.g. a final Pushgateway push), shuts logging down and flushes
    stdout/stderr, then `os._exit(code)`. Call it last, after `shutdown()`; it never returns.
    """
    try:
        atexit._run_exitfuncs()
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        os._exit(int(code))
