"""Hard-negative mining cost: candidates scored per second and the finetuning step time of `random_n`
(N random candidates scored by ITM, the paper) against `itc_topk` (the same draw ranked by ITC cosine).

    python bench/bench_mining.py [--samples 256] [--batch 8] [--candidates 31] [--hard 3] [--steps 6]

Builds a synthetic dataset in a temporary folder, runs the real finetuning objective (the hinge term
with its candidate store, + IAIS) on the `tiny` model in plain PyTorch (forward + backward, no
optimiser), interleaving the two mining modes step by step, and prints one JSON object per mode with
the random_n step as the baseline of the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=31)
    parser.add_argument("--hard", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    from finetune.config import load_finetune_config
    from finetune.task import FinetuneTask
    from pretrain.objectives import Progress

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "data_tools",
                "build",
                "synthetic",
                "--samples",
                str(args.samples),
                "--seed",
                "0",
                "--out",
                str(data),
            ],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        objectives, loaders = {}, {}
        for mode in ("random_n", "itc_topk"):
            cfg = load_finetune_config(
                REPO / "configs" / "tiny.yaml",
                [
                    f"data.paths=[{data}]",
                    f"data.batch_size={args.batch}",
                    f"finetune.candidates={args.candidates}",
                    f"finetune.hard={args.hard}",
                    f"finetune.mining={mode}",
                    f"run.dir={tmp}/run",
                ],
            )
            task = FinetuneTask(cfg)
            loader = task.train_loader(args.batch, 0, 1)
            torch.manual_seed(0)
            model = task.build_model(loader.tokenizer, fresh=True, say=lambda _: None).train()
            objectives[mode] = (model, task.objective())
            loaders[mode] = iter(loader)
        times: dict[str, list[float]] = {"random_n": [], "itc_topk": []}
        rates: dict[str, list[float]] = {"random_n": [], "itc_topk": []}
        for step in range(args.steps + 2):
            for mode in ("random_n", "itc_topk") if step % 2 else ("itc_topk", "random_n"):
                model, objective = objectives[mode]
                batch = next(loaders[mode])
                start = time.perf_counter()
                out = objective(model, batch, Progress(step, 1000))
                out.total.backward()
                model.zero_grad(set_to_none=True)
                if step >= 2:  # the first two steps warm up (caches, allocator)
                    times[mode].append(time.perf_counter() - start)
                    rates[mode].append(float(out.logs["candidates_per_second"]))
        base = statistics.median(times["random_n"])
        for mode in ("random_n", "itc_topk"):
            step_s = statistics.median(times[mode])
            print(
                json.dumps(
                    {
                        "bench": "mining",
                        "mode": mode,
                        "preset": "tiny",
                        "batch": args.batch,
                        "candidates": args.candidates,
                        "hard": args.hard,
                        "threads": args.threads,
                        "step_seconds": round(step_s, 4),
                        "candidates_per_second": round(statistics.median(rates[mode]), 1),
                        "step_ratio_vs_random_n": round(step_s / base, 3),
                    }
                )
            )


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
