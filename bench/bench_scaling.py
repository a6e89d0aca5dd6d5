"""Data-parallel scaling on CPU, as a proxy until a multi-GPU machine exists: per-rank throughput of
the `tiny` preset on 2 ranks against 1, at ZeRO 0 and ZeRO 2, and the share of step time spent in
collectives.

Each rank is `python -m pretrain` launched with env:// variables (as tests/pretrain/runs.py does),
through this file's `--rank-child` entry, which first wraps every torch.distributed collective
(all_reduce, all_gather, all_gather_into_tensor, reduce_scatter, broadcast, barrier, ...; the ones
DeepSpeed and pretrain/distributed.py call) with a wall-clock timer (an async op is timed until its
`wait()` returns), and DeepSpeed's `engine.step` with a timestamp. Step time = time between the ends
of consecutive optimizer steps (data wait included), the first `--warmup` steps dropped; collective
time = the collectives that start inside those windows. One JSON object per (zero, world) with the
medians over ranks and trials, then one with the 2-rank/1-rank ratios.

Read the figures as a proxy only: gloo on one host, 2 shared cores (the 2-rank runs compete for them
with each other and with other jobs: see `load_avg_1m`), a model small enough that the gradient
all-reduce is cheap next to Python overhead. The plan for 8 GPUs x 16 nodes is in docs/scaling.md.

    .venv/bin/python bench/bench_scaling.py [--steps 30] [--trials 2] [--zero 0 2]
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "reduce",
    "broadcast",
    "barrier",
    "all_gather_object",
    "broadcast_object_list",
    "gather",
    "scatter",
    "all_to_all_single",
    "monitored_barrier",
)
OUT_ENV = "BENCH_SCALING_OUT"


# --- inside a rank ------------------------------------------------------------------------------
class _TimedWork:
    """An async collective's handle whose wait() adds the time until completion to the record."""

    def __init__(self, work, record: list) -> None:
        self._work, self._record = work, record

    def wait(self, *args, **kwargs):
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._record[1] = time.perf_counter() - self._record[0]

    def __getattr__(self, name):
        return getattr(self._work, name)


def install_timers(calls: list[list]) -> None:
    """Wrap torch.distributed's collectives (both namespaces) so that each outermost call appends
    [start, seconds, name] to `calls`."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    depth = [0]

    def wrap(name, fn):
        def timed(*args, **kwargs):
            if depth[0]:
                return fn(*args, **kwargs)
            depth[0] += 1
            record = [time.perf_counter(), 0.0, name]
            try:
                result = fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                record[1] = time.perf_counter() - record[0]
                calls.append(record)
            if kwargs.get("async_op") and result is not None:
                return _TimedWork(result, record)
            return result

        return timed

    for name in COLLECTIVES:
        fn = getattr(c10d, name, None)
        if fn is None:
            continue
        timed = wrap(name, fn)
        setattr(c10d, name, timed)
        if getattr(dist, name, None) is fn:
            setattr(dist, name, timed)


def rank_child(argv: list[str]) -> int:
    """Run `python -m pretrain argv` with timed collectives and step ends; write them at exit."""
    import atexit

    calls: list[list] = []
    install_timers(calls)
    from deepspeed.runtime.engine import DeepSpeedEngine

    steps: list[float] = []
    step = DeepSpeedEngine.step

    def timed_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        steps.append(time.perf_counter())
        return out

    DeepSpeedEngine.step = timed_step

    def write() -> None:
        rank = os.environ.get("RANK", "0")
        Path(os.environ[OUT_ENV], f"rank{rank}.json").write_text(json.dumps({"steps": steps, "calls": calls}))

    atexit.register(write)
    sys.argv = ["pretrain", *argv]
    try:
        runpy.run_module("pretrain", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


# --- the driver ---------------------------------------------------------------------------------
def env_for(rank: int, world: int, port: int, out: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
        PYTHONUNBUFFERED="1",
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    env[OUT_ENV] = str(out)
    return env


def run(data: Path, work: Path, world: int, zero: int, steps: int, port: int) -> list[dict]:
    """One run of `steps` optimizer steps on `world` ranks; per-rank records."""
    out = work / f"z{zero}-w{world}-{port}"
    out.mkdir(parents=True)
    args = [
        "--config",
        str(TINY),
        f"data.paths=[{data}]",
        f"run.dir={out / 'run'}",
        "metrics.enabled=false",
        f"train.steps={steps}",
        f"train.log_every={steps}",
        f"zero.stage={zero}",
        "checkpoint.every_steps=100000",
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--rank-child", *args],
            cwd=REPO,
            env=env_for(r, world, port, out),
            stdout=open(out / f"rank{r}.log", "w"),
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    codes = [p.wait(timeout=900) for p in procs]
    if any(codes):
        raise SystemExit(f"bench_scaling: zero {zero} world {world} exited {codes}; see {out}/rank*.log")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def summarise(record: dict, warmup: int, per_rank_batch: int) -> dict[str, float]:
    """Median step seconds, samples/s of this rank, collective seconds per step and their share."""
    ends = record["steps"][warmup:]
    windows = list(zip(ends[:-1], ends[1:]))
    step_s = [b - a for a, b in windows]
    coll_s = [sum(s for start, s, _ in record["calls"] if a <= start < b) for a, b in windows]
    by_name: dict[str, float] = {}
    for start, s, name in record["calls"]:
        if windows and windows[0][0] <= start < windows[-1][1]:
            by_name[name] = by_name.get(name, 0.0) + s / len(windows)
    step = statistics.median(step_s)
    return {
        "step_s": step,
        "samples_per_s": per_rank_batch / step,
        "collective_s": statistics.median(coll_s),
        "collective_share": sum(coll_s) / sum(step_s),
        "by_name": by_name,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--rank-child":
        return rank_child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="first optimizer steps not timed")
    parser.add_argument("--trials", type=int, default=2, help="interleaved trials (1 rank, 2 ranks) per ZeRO stage")
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--samples", type=int, default=2048, help="synthetic scenes to build")
    parser.add_argument("--port", type=int, default=29731)
    args = parser.parse_args(argv)
    import yaml

    per_rank_batch = yaml.safe_load(TINY.read_text())["data"]["batch_size"]
    port = args.port
    with tempfile.TemporaryDirectory() as tmp:
        work, data = Path(tmp), Path(tmp) / "synthetic"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "data_tools",
                "build",
                "synthetic",
                "--samples",
                str(args.samples),
                "--out",
                str(data),
            ],
            cwd=REPO,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        for zero in args.zero:
            results: dict[int, list[dict]] = {1: [], 2: []}
            for _ in range(args.trials):  # interleaved: load swings hit both world sizes alike
                for world in (1, 2):
                    port += 1
                    results[world] += [
                        summarise(r, args.warmup, per_rank_batch)
                        for r in run(data, work, world, zero, args.steps, port)
                    ]
            summary = {}
            for world, rows in results.items():
                names = sorted({n for r in rows for n in r["by_name"]})
                summary[world] = {
                    "step_s": statistics.median(r["step_s"] for r in rows),
                    "per_rank_samples_per_s": statistics.median(r["samples_per_s"] for r in rows),
                    "collective_s_per_step": statistics.median(r["collective_s"] for r in rows),
                    "collective_share": statistics.median(r["collective_share"] for r in rows),
                    "collective_s_per_step_by_op": {
                        n: round(statistics.median(r["by_name"].get(n, 0.0) for r in rows), 5) for n in names
                    },
                }
                print(
                    json.dumps(
                        {
                            "bench": "scaling",
                            "preset": "tiny",
                            "zero": zero,
                            "world": world,
                            "per_rank_batch": per_rank_batch,
                            "steps_timed": args.steps - args.warmup - 1,
                            "trials": args.trials,
                            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary[world].items()},
                            "cpus": os.cpu_count(),
                            "load_avg_1m": round(os.getloadavg()[0], 2),
                        }
                    ),
                    flush=True,
                )
            print(
                json.dumps(
                    {
                        "bench": "scaling",
                        "preset": "tiny",
                        "zero": zero,
                        "per_rank_throughput_2_over_1": round(
                            summary[2]["per_rank_samples_per_s"] / summary[1]["per_rank_samples_per_s"], 3
                        ),
                        "total_throughput_2_over_1": round(
                            2 * summary[2]["per_rank_samples_per_s"] / summary[1]["per_rank_samples_per_s"], 3
                        ),
                        "collective_share_2_ranks": round(summary[2]["collective_share"], 3),
                        "note": "CPU proxy: gloo, 2 cores shared with other jobs",
                    }
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
