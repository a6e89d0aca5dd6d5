"""Data order at internet scale: seconds and peak memory of planning, same-layout resume, elastic
re-cut and a two-dataset mixture, for 10M, 100M, 1B and 5B samples in 10,000-sample shards, at
1024 ranks x 8 workers (8192 streams), as one rank does it.

Prints one JSON object per (samples, case, implementation). `impl` is "runs" (data_tools/order.py)
or "reference" (bench/order_per_sample.py, the per-sample implementation), the baseline, run where
it fits in memory (10M and 100M). Each measurement runs in fresh subprocesses, so one case's memory
never shows in another's:
- `seconds`: the timed part, in a process that has only imported numpy and the order module. Setup
  that a planning process would not do (writing the saved cursor to resume from) runs in another
  subprocess beforehand; reading the cursor's JSON is timed, as the planning process must do it.
- `peak_mb`: the process's peak resident memory (ru_maxrss, the kernel's high-water mark, so no
  peak between samples is missed) above its resident size right after those imports (the import
  baseline), in the same process as `seconds`. `rss_mb`: that peak in total.
- `traced_mb`: the peak of Python and numpy allocations during the timed part (tracemalloc, which
  numpy reports its buffers to), in a second process of its own (tracing slows the timed part).

The cases, each what a rank does:
- plan: the epoch list, the plan, this rank's cursor and batch schedule, the first block of each of
  its 8 streams located (dataset, shard, index).
- resume: load a saved global cursor (JSON, every stream stopped inside a block), resume at the
  same layout, and the same per-rank work as plan.
- recut: the same cursor resumed at 512 ranks x 8 workers (elastic): what is left, the new plan,
  the new global cursor as JSON, and the same per-rank work.
- mixture: two datasets of half the samples each, weights 1.0 and 0.5, planned as in plan.

    .venv/bin/python bench/bench_order.py [--samples 10M,100M,1B,5B] [--reference-up-to 100M]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARD = 10_000
WORLD, WORKERS, BATCH, BLOCK = 1024, 8, 32, 256
CASES = ("plan", "resume", "recut", "mixture")


def parse_count(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}
    return int(float(text[:-1]) * scale[text[-1].upper()]) if text[-1].upper() in scale else int(text)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def per_rank_work(order, plan, cursor, rank: int = 0) -> int:
    """What a rank's loader does before its first batch: schedule, first block of each stream located."""
    schedule = plan.rank_schedule(cursor, rank)
    for s in range(rank * plan.layout.workers, (rank + 1) * plan.layout.workers):
        start = int(cursor["streams"][s]["position"])
        for _, positions in plan.delivery(s, start):
            plan.epoch_list.locate(positions)
            break
    return len(schedule)


def saved_cursor(order, samples: int) -> str:
    """A global cursor (JSON) with every stream stopped at a pseudo-random point, mostly inside a block."""
    source = order.Source((SHARD,) * (samples // SHARD), sha256="a" * 64)
    plan = order.Plan(order.EpochList([source], 1, 0), order.Layout(WORLD, WORKERS, BATCH, BLOCK))
    cursor = plan.new_cursor()
    rng = np.random.default_rng(0)
    for s, state in enumerate(cursor["streams"]):
        position = int(rng.integers(0, plan.stream_length(s) + 1))
        state.update(position=position, batches=-(-position // BATCH))
    return json.dumps(cursor)


def order_module(impl: str):
    if impl == "reference":
        sys.path.insert(0, str(REPO))
        from bench import order_per_sample as order
    else:
        from data_tools import order
    return order


def run_case(case: str, samples: int, impl: str, cursor_path: str | None, traced: bool = False) -> dict:
    order = order_module(impl)
    before = rss_mb()  # the import baseline: Python, numpy and the order module
    if traced:
        tracemalloc.start()
    start = time.perf_counter()
    layout = order.Layout(WORLD, WORKERS, BATCH, BLOCK)
    shards = (SHARD,) * (samples // SHARD)
    if case in ("plan", "mixture"):
        if case == "plan":
            sources = [order.Source(shards, sha256="a" * 64)]
        else:
            half = shards[: len(shards) // 2]
            sources = [order.Source(half, sha256="a" * 64, weight=1.0), order.Source(half, sha256="b" * 64, weight=0.5)]
        plan = order.Plan(order.EpochList(sources, 1, 0), layout)
        cursor = plan.new_cursor(rank=0)
        extra = {"epoch_samples": len(plan.epoch_list), "batches": per_rank_work(order, plan, cursor)}
    else:
        cursor = json.loads(Path(cursor_path).read_text())
        epoch_list = order.EpochList([order.Source(shards, sha256="a" * 64)], 1, 0)
        target = layout if case == "resume" else order.Layout(WORLD // 2, WORKERS, BATCH, BLOCK)
        plan, cursor = order.resume(epoch_list, target, cursor)
        text = json.dumps(cursor)
        extra = {
            "base_runs": int(len(plan.base)),
            "cursor_json_mb": round(len(text) / 2**20, 2),
            "batches": per_rank_work(order, plan, cursor),
        }
    seconds = time.perf_counter() - start
    if traced:
        return {"traced_mb": round(tracemalloc.get_traced_memory()[1] / 2**20, 1)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "bench": "order",
        "case": case,
        "samples": samples,
        "shards": len(shards),
        "streams": WORLD * WORKERS,
        "impl": impl,
        "seconds": round(seconds, 3),
        "peak_mb": round(max(0.0, peak - before), 1),
        "rss_mb": round(peak, 1),
        **extra,
    }


def measure(case: str, samples: int, impl: str) -> dict:
    """One case in fresh processes: the saved cursor written by one, time and RSS in the next, traced in a third."""

    def one(*args: str) -> str:
        done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=REPO)
        if done.returncode:
            raise RuntimeError((done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1])
        return done.stdout.strip()

    with tempfile.TemporaryDirectory() as tmp:
        cursor_path = str(Path(tmp) / "cursor.json")
        try:
            if case in ("resume", "recut"):
                one("--write-cursor", str(samples), impl, cursor_path)
            result = json.loads(one("--one", case, str(samples), impl, cursor_path))
            result.update(json.loads(one("--one", case, str(samples), impl, cursor_path, "--traced")))
        except RuntimeError as err:
            return {"bench": "order", "case": case, "samples": samples, "impl": impl, "error": str(err)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", default="10M,100M,1B,5B", help="comma-separated sample counts (K, M, B suffixes)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--reference-up-to", default="100M", help="run the reference baseline up to this many samples")
    # the per-measurement subprocesses
    parser.add_argument("--one", nargs=4, metavar=("CASE", "SAMPLES", "IMPL", "CURSOR"), help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write-cursor", nargs=3, metavar=("SAMPLES", "IMPL", "CURSOR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_cursor:
        samples, impl, path = args.write_cursor
        Path(path).write_text(saved_cursor(order_module(impl), int(samples)))
        return
    if args.one:
        case, samples, impl, path = args.one
        print(json.dumps(run_case(case, int(samples), impl, path, traced=args.traced)), flush=True)
        return
    limit = parse_count(args.reference_up_to)
    for samples in [parse_count(x) for x in args.samples.split(",")]:
        for case in args.cases.split(","):
            for impl in ("runs", "reference") if samples <= limit else ("runs",):
                print(json.dumps(measure(case, samples, impl)), flush=True)


if __name__ == "__main__":
    main()
