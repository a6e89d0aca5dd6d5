"""Exit-time aborts of 2-process DeepSpeed runs: the naive ending against `pretrain.dist_env`'s.

Each run starts 2 ranks under torchrun (`--launcher torchrun`, the default) or as 2 plain processes
with the `env://` variables set (`--launcher env`, cheaper: no agent). Every rank builds a small
real DeepSpeed engine (ZeRO 2, fp32, gloo on CPU) over a tiny torch model, trains a few steps, and
ends either
- `naive`: `destroy_process_group()` and a normal interpreter exit, or
- `clean`: `dist_env.shutdown()` then `dist_env.exit_process(0)`.
A run counts as aborted when a rank died of a signal (SIGABRT: "terminate called without an active
exception") or its exit status is not 0 although it printed that training finished. Prints one JSON
object per mode, then one with the comparison.

    python bench/bench_shutdown.py --runs 200 --modes naive,clean
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DONE = "TRAINING-DONE"


def worker(mode: str) -> None:
    """One rank: a few DeepSpeed steps, then the chosen ending."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from pretrain import dist_env

    env = dist_env.detect()
    dist_env.init_distributed(env, timeout_s=120)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    for _ in range(3):
        x = torch.randn(4, 16)  # [batch, features]
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
    print(f"{DONE} rank={env.rank}", flush=True)
    if mode == "naive":
        dist.destroy_process_group()
        return  # normal interpreter exit
    dist_env.shutdown()
    dist_env.exit_process(0)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_run(mode: str, launcher: str, timeout_s: float) -> dict:
    """Start 2 ranks, wait, classify: ok | abort (signal) | error (other non-zero) | timeout."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    port = free_port()
    script = [str(Path(__file__).resolve()), "--worker", mode]
    with tempfile.TemporaryFile("w+") as log:
        if launcher == "torchrun":
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                *script,
            ]
            procs = [subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)]
        else:
            procs = [
                subprocess.Popen(
                    [sys.executable, *script],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                    env=dict(
                        env,
                        RANK=str(r),
                        WORLD_SIZE="2",
                        LOCAL_RANK=str(r),
                        LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port),
                    ),
                )
                for r in range(2)
            ]
        codes, deadline = [], time.monotonic() + timeout_s
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
                codes.append("timeout")
        log.seek(0)
        text = log.read()
    finished = text.count(DONE) == 2
    aborted = (
        "terminate called" in text
        or "SIGABRT" in text
        or "Signal 6" in text
        or any(isinstance(c, int) and c == -signal.SIGABRT for c in codes)
    )
    if "timeout" in codes:
        outcome = "timeout"
    elif aborted:
        outcome = "abort"
    elif all(c == 0 for c in codes) and finished:
        outcome = "ok"
    else:
        outcome = "error"
    return {"outcome": outcome, "codes": codes, "finished": finished, "tail": text[-600:] if outcome != "ok" else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="consecutive 2-process runs per mode")
    parser.add_argument("--modes", default="naive,clean", help="comma list of naive, clean")
    parser.add_argument("--launcher", choices=("torchrun", "env"), default="torchrun")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--samples-out", help="append one JSON line per failed run here (for diagnosis)")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    results = {}
    for mode in args.modes.split(","):
        counts = {"ok": 0, "abort": 0, "error": 0, "timeout": 0}
        start = time.monotonic()
        for i in range(args.runs):
            run = one_run(mode, args.launcher, args.timeout)
            counts[run["outcome"]] += 1
            if (i + 1) % 10 == 0:  # progress on stderr: a full measurement takes about an hour on 2 busy cores
                print(f"{mode}: {i + 1}/{args.runs} runs, {counts}", file=sys.stderr, flush=True)
            if run["outcome"] != "ok" and args.samples_out:
                with open(args.samples_out, "a") as out:
                    out.write(json.dumps({"mode": mode, "run": i, **run}) + "\n")
        results[mode] = counts
        print(
            json.dumps(
                {
                    "bench": "shutdown",
                    "mode": mode,
                    "launcher": args.launcher,
                    "runs": args.runs,
                    **counts,
                    "abort_rate": counts["abort"] / args.runs,
                    "seconds_per_run": round((time.monotonic() - start) / args.runs, 2),
                }
            ),
            flush=True,
        )
    if {"naive", "clean"} <= results.keys():
        print(
            json.dumps(
                {
                    "bench": "shutdown",
                    "metric": "aborts",
                    "launcher": args.launcher,
                    "runs": args.runs,
                    "baseline_naive": results["naive"]["abort"],
                    "clean": results["clean"]["abort"],
                    "clean_failures": results["clean"]["abort"]
                    + results["clean"]["error"]
                    + results["clean"]["timeout"],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
