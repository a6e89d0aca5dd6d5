"""Data order at internet scale: seconds and peak memory of planning, same-layout resume, elastic
re-cut and a two-dataset mixture, for 10M, 100M, 1B and 5B samples in 10,000-sample shards, at
1024 ranks x 8 workers (8192 streams), as one rank does it.

Prints one JSON object per (samples, case, implementation). `impl` is "runs" (data_tools/order.py)
or "reference" (tests/data_tools/order_reference.py, today's per-sample implementation before this
change), the baseline, run where it fits in memory (10M and 100M). Each measurement runs in its own
subprocess; `seconds` is the timed part (setup such as writing the cursor to resume from is not
timed), `peak_mb` the growth of the process's peak resident memory over its size when the timed
part starts (ru_maxrss), `rss_mb` that peak in total (Python, numpy and the imports included).

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
import time
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


def run_case(case: str, samples: int, impl: str) -> dict:
    if impl == "reference":
        sys.path.insert(0, str(REPO))
        from tests.data_tools import order_reference as order
    else:
        from data_tools import order
    layout = order.Layout(WORLD, WORKERS, BATCH, BLOCK)
    shards = (SHARD,) * (samples // SHARD)
    saved = saved_cursor(order, samples) if case in ("resume", "recut") else None
    before = rss_mb()
    start = time.perf_counter()
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
        cursor = json.loads(saved)
        epoch_list = order.EpochList([order.Source(shards, sha256="a" * 64)], 1, 0)
        target = layout if case == "resume" else order.Layout(WORLD // 2, WORKERS, BATCH, BLOCK)
        plan, cursor = order.resume(epoch_list, target, cursor)
        text = json.dumps(cursor)
        extra = {"base_runs": int(len(plan.base)), "cursor_json_mb": round(len(text) / 2**20, 2), "batches": per_rank_work(order, plan, cursor)}
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"bench": "order", "case": case, "samples": samples, "shards": len(shards), "streams": WORLD * WORKERS, "impl": impl,
            "seconds": round(seconds, 3), "peak_mb": round(max(0.0, peak - before), 1), "rss_mb": round(peak, 1), **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", default="10M,100M,1B,5B", help="comma-separated sample counts (K, M, B suffixes)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--reference-up-to", default="100M", help="run the reference baseline up to this many samples")
    parser.add_argument("--one", nargs=3, metavar=("CASE", "SAMPLES", "IMPL"), help=argparse.SUPPRESS)  # the per-case subprocess
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one[0], int(args.one[1]), args.one[2])), flush=True)
        return
    limit = parse_count(args.reference_up_to)
    for samples in [parse_count(x) for x in args.samples.split(",")]:
        for case in args.cases.split(","):
            for impl in ("runs", "reference") if samples <= limit else ("runs",):
                done = subprocess.run([sys.executable, __file__, "--one", case, str(samples), impl], capture_output=True, text=True, cwd=REPO)
                if done.returncode:
                    print(json.dumps({"bench": "order", "case": case, "samples": samples, "impl": impl, "error": done.stderr.strip().splitlines()[-1:]}), flush=True)
                else:
                    print(done.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
