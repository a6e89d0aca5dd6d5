"""Helpers for the trainer's process-level tests: the synthetic dataset, launching `python -m pretrain`
as N ranks (env:// variables set by us, so each rank's exit code is visible) or under torchrun, and
reading what a run left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
TINY = str(REPO / "configs" / "tiny.yaml")
RUN_TIMEOUT_S = 300


def env_for(rank: int = 0, world: int = 1, port: int | None = None, **extra: str) -> dict[str, str]:
    """The environment of one rank: CPU DeepSpeed, one thread (2 shared cores), env:// variables."""
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
        PYTHONUNBUFFERED="1",
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if world > 1:
        env.update(
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    env.update(extra)
    return env


def base_args(data: Path, run_dir: Path, *overrides: str) -> list[str]:
    """Tiny preset on `data`, no metrics endpoint (tests run side by side), the given overrides."""
    return [
        "--config",
        TINY,
        f"data.paths=[{data}]",
        f"run.dir={run_dir}",
        "metrics.enabled=false",
        "train.log_every=1",
        "train.lost_rank_timeout_s=60",
        *overrides,
    ]


def start_ranks(
    world: int,
    args: Sequence[str],
    port: int,
    logs: Path,
    extra_env: dict[int, dict[str, str]] | None = None,
    module: str = "pretrain",
) -> list[subprocess.Popen]:
    """`world` processes of `python -m <module> args`, rank r's stderr+stdout in logs/rank<r>.log."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(world):
        env = env_for(rank, world, port, **(extra_env or {}).get(rank, {}))
        out = open(logs / f"rank{rank}.log", "w")
        procs.append(
            subprocess.Popen(
                [PYTHON, "-m", module, *args],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = RUN_TIMEOUT_S) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            kill_all(procs)
            pytest.fail(f"a rank did not finish within {timeout} s")
    return codes


def kill_all(procs: list[subprocess.Popen], sig: int = signal.SIGKILL) -> None:
    """Signal every process (and its session: DataLoader workers) that is still running; reap them."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def run_ranks(world: int, args: Sequence[str], port: int, logs: Path, **kw) -> list[int]:
    return wait_all(start_ranks(world, args, port, logs, **kw))


def wait_for_line(log: Path, needle: str, procs: list[subprocess.Popen], timeout: float = RUN_TIMEOUT_S) -> None:
    """Poll a rank's log until `needle` appears (fails if every process ended first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and needle in log.read_text(errors="replace"):
            return
        if all(p.poll() is not None for p in procs):
            pytest.fail(f"processes ended before {needle!r} appeared in {log}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    kill_all(procs)
    pytest.fail(f"{needle!r} did not appear in {log} within {timeout} s")


def logs_text(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(logs.glob("*.log")))


def train_records(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl train records by step (a resumed run's later record of a step wins)."""
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train":
            records[record["step"]] = record
    return records


def latest_tag(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def model_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint (any ZeRO stage), through the exporter's consolidation."""
    from pretrain.export import consolidated_state_dict

    return consolidated_state_dict(checkpoint)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def build_synthetic(out: Path, samples: int = 256) -> Path:
    subprocess.run(
        [PYTHON, "-m", "data_tools", "build", "synthetic", "--samples", str(samples), "--seed", "0", "--out", str(out)],
        cwd=REPO,
        env=env_for(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def read_keys(run_dir: Path) -> list[tuple[int, int, str]]:
    """(epoch, step, key) of every consumed sample, all ranks (train.record_keys=true)."""
    rows = []
    for path in sorted((run_dir / "keys").glob("rank*.txt")):
        for line in path.read_text().splitlines():
            epoch, step, key = line.split(" ", 2)
            rows.append((int(epoch), int(step), key))
    return rows
