"""Loader throughput against a bare decode+resize loop over the same image bytes, and where the
loader's CPU time goes, stage by stage.

Datasets (built into a temporary folder by the project's own builders):
- `coco384`: the real COCO photos of ../shared/data/coco_mini (train2017), stored at 384 px
  (`build coco ... --split train2017 --resize 384`); where coco_mini is absent, generated 640x480
  JPEGs in COCO layout built the same way. Loader crops: 224 px.
- `synthetic`: the relational scenes (`build synthetic`, 64 px PNG canvases), 224 px crops as for
  COCO (`--synthetic-size 64`: the `tiny` preset's size, where the bare loop's resize is a copy).

Measurements, interleaved trial by trial (bare, then the loader at each worker count) so that a
shared machine's load swings hit all of them alike; medians over trials:
- `bare`: one process, PIL decode + convert RGB + BILINEAR resize to the crop size, bytes already in
  memory. The baseline every ratio divides by.
- the loader (`data_tools.loader.Loader`, random resized crops, tokenisation, MLM masking, collate)
  at 0, 1 and 2 worker processes, from the shards on disk, worker start-up included. Each batch is
  released as the training loop releases it (`release_pixels`), so workers reuse their pixel
  buffers (data_tools.pixel_pool). Pixels leave the loader as uint8: normalisation happens on the
  training device (`pretrain.engine.to_engine`), so it is not in the loader's time; its host cost is
  printed as the `normalise` stage for reference.
- `ratio`: loader samples/s over bare samples/s (wall clock); `cpu_ratio`: bare CPU ms per sample
  over the loader's (this process plus its joined workers). On a machine whose cores are busy with
  other jobs the wall-clock figures at 1 and 2 workers measure the machine, not the loader: read
  `cpu_ratio` there, and `load_avg_1m`.
- stages: CPU ms per sample of each stage in one in-process pass (workers=0), each stage's own time
  (nested stages subtracted): read (tar members), parse (json, caption choice), decode (image
  bytes -> RGB pixels, `data_tools.images.decode_pixels`: simplejpeg for colour and grey JPEGs, PIL
  otherwise), crop_resize, tokenize, mask (MLM), collate (the rest of batch assembly),
  normalise (host, reference only), other (order, batching, generators: total - the rest).

Prints one JSON object per (dataset, measurement).

    .venv/bin/python bench/bench_loader.py [--trials 5] [--repeat 8] [--workers 0 1 2] [--datasets coco384 synthetic]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
COCO_MINI = REPO.parent / "shared" / "data" / "coco_mini"
BATCH = 32


def generated_coco(root: Path, count: int = 80) -> Path:
    """COCO layout with smooth random 640x480 photo-like JPEGs (when coco_mini is absent)."""
    images = root / "images" / "train2017"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries, captions = [], []
    for i in range(count):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.BICUBIC).save(images / f"{i:012d}.jpg", quality=90)
        entries.append({"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480})
        captions.append({"id": i, "image_id": i, "caption": f"a blurry picture with colours number {i}"})
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_train2017.json").write_text(
        json.dumps({"images": entries, "annotations": captions})
    )
    return root


def build(
    work: Path, which: str, synthetic_size: int = 224, coco: Path = COCO_MINI
) -> tuple[Path, str, int, str | None]:
    """(dataset folder, description, crop size, tokenizer) of one benchmark dataset."""
    from data_tools.__main__ import main
    from data_tools.errors import run_cli

    out = work / which
    if which == "coco384":
        have = (coco / "annotations" / "captions_train2017.json").is_file()
        source, name = (
            (coco, "coco_mini train2017 at 384 px")
            if have
            else (generated_coco(work / "gen"), "generated 640x480 at 384 px")
        )
        args = ["build", "coco", str(source), "--split", "train2017", "--resize", "384", "--out", str(out)]
        size, tokenizer = 224, "minilm"
    else:
        args = ["build", "synthetic", "--samples", "160", "--seed", "0", "--image-size", "64", "--out", str(out)]
        name, size, tokenizer = f"synthetic scenes, 64 px PNG, {synthetic_size} px crops", synthetic_size, None
    code = run_cli(main, args)
    if code != 0:
        raise SystemExit(f"bench_loader: building {which} failed with exit code {code}")
    return out, name, size, tokenizer


def stored_images(dataset: Path) -> list[bytes]:
    """The image bytes of every sample, read through the manifest offsets (the bare loop's input)."""
    from data_tools.manifest import load_dataset

    info, table = load_dataset(dataset)
    out = []
    for row in table.to_pylist():
        members = json.loads(row["members"])
        ext = next(e for e in ("jpg", "jpeg", "png", "webp") if e in members)
        with open(info.resolve(dataset, info.shards[row["shard"]].location), "rb") as f:
            f.seek(members[ext][0])
            out.append(f.read(members[ext][1]))
    return out


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (DataLoader workers are joined at the end of an epoch)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bare_loop(images: list[bytes], repeat: int, size: int) -> tuple[float, float]:
    """(samples/s, CPU ms per sample) of decode + resize only."""
    cpu, start = cpu_seconds(), time.perf_counter()
    for _ in range(repeat):
        for data in images:
            Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BILINEAR)
    n = repeat * len(images)
    return n / (time.perf_counter() - start), 1000 * (cpu_seconds() - cpu) / n


def loader_config(dataset: Path, tokenizer: str | None, repeat: int, size: int, workers: int):
    from data_tools.loader import DataConfig

    return DataConfig(
        paths=[str(dataset)],
        weights=[float(repeat)],
        batch_size=BATCH,
        workers=workers,
        image_size=size,
        max_text_len=32,
        tokenizer=tokenizer,
    )


def pipeline(config) -> tuple[float, float, int]:
    """(samples/s, CPU ms per sample, samples) of one epoch of the loader (a weight-`repeat` mixture
    of the dataset), worker start-up included, tokenizer loading not."""
    from data_tools.loader import Loader
    from data_tools.pixel_pool import release_pixels

    loader = Loader(config)
    samples = 0
    cpu, start = cpu_seconds(), time.perf_counter()
    for batch in loader:
        samples += int(batch["sample_mask"].sum())
        release_pixels(batch)  # as the training loop does once the pixels are on the device
    return samples / (time.perf_counter() - start), 1000 * (cpu_seconds() - cpu) / samples, samples


class StageClock:
    """Exclusive CPU time (this thread) per named stage: a stage called inside another is subtracted
    from the outer one."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[list[float]] = []  # [start, time spent in nested stages]

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._stack.append([time.thread_time(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                start, nested = self._stack.pop()
                spent = time.thread_time() - start
                self.seconds[name] = self.seconds.get(name, 0.0) + spent - nested
                if self._stack:
                    self._stack[-1][1] += spent

        return timed


@contextlib.contextmanager
def instrumented(clock: StageClock):
    """Wrap the loader's stage functions where the in-process pipeline looks them up."""
    import data_tools.collate as collate_mod
    import data_tools.decode as decode_mod
    import data_tools.loader as loader_mod
    import data_tools.shard_reader as reader_mod
    import data_tools.transforms as transforms_mod

    targets = [
        (reader_mod.ShardReader, "fetch", "read"),
        (loader_mod, "decode_sample", "parse"),
        (decode_mod, "decode_pixels", "decode"),
        (loader_mod, "transform_sample", "crop_resize"),
        (collate_mod.TextEncoder, "__call__", "tokenize"),
        (collate_mod, "mlm_mask", "mask"),
        (loader_mod, "collate", "collate"),
        (loader_mod, "normalise", "normalise"),  # where the loader itself normalises (before pixels went uint8)
    ]
    saved = [(owner, attr, owner.__dict__[attr]) for owner, attr, _ in targets if attr in owner.__dict__]
    try:
        for owner, attr, name in targets:
            if attr in owner.__dict__:
                setattr(owner, attr, clock.wrap(name, owner.__dict__[attr]))
        yield transforms_mod
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def stages(config) -> dict[str, float]:
    """CPU ms per sample by stage, one in-process epoch (workers=0), plus host normalisation."""
    from data_tools.loader import Loader

    clock = StageClock()
    loader = Loader(config)
    samples, start = 0, time.thread_time()
    with instrumented(clock) as transforms_mod:
        normalise = clock.wrap("normalise", transforms_mod.normalise)
        for batch in loader:
            samples += int(batch["sample_mask"].sum())
            if "pixel_uint8" in batch:  # what the device does, timed on the host for reference
                normalise(batch["pixel_uint8"])
    total = time.thread_time() - start
    out = {name: 1000 * s / samples for name, s in clock.seconds.items()}
    out["other"] = 1000 * total / samples - sum(out.values())
    out["total_without_normalise"] = 1000 * total / samples - out.get("normalise", 0.0)
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


def bench_dataset(
    which: str, work: Path, trials: int, workers: list[int], repeat: int, synthetic_size: int, coco: Path
) -> None:
    dataset, source, size, tokenizer = build(work, which, synthetic_size, coco)
    images = stored_images(dataset)
    bare_loop(images, 1, size)  # warm the page cache and PIL
    configs = {w: loader_config(dataset, tokenizer, repeat, size, w) for w in workers}
    bare: list[tuple[float, float]] = []
    full: dict[int, list[tuple[float, float, int]]] = {w: [] for w in workers}
    staged: list[dict[str, float]] = []
    for _ in range(trials):  # interleaved: a load swing hits every measurement of a trial alike
        bare.append(bare_loop(images, repeat, size))
        for w in workers:
            full[w].append(pipeline(configs[w]))
        staged.append(stages(dataclasses.replace(configs[workers[0]], workers=0)))
    base_rate, base_cpu = median([r for r, _ in bare]), median([c for _, c in bare])
    common = {
        "bench": "loader",
        "data": source,
        "image_size": size,
        "batch_size": BATCH,
        "trials": trials,
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    rates = {}
    for w in workers:
        rate, cpu = median([r for r, _, _ in full[w]]), median([c for _, c, _ in full[w]])
        rates[w] = rate
        print(
            json.dumps(
                {
                    **common,
                    "workers": w,
                    "samples": full[w][0][2],
                    "loader_samples_per_s": round(rate, 1),
                    "bare_samples_per_s": round(base_rate, 1),
                    "ratio": round(rate / base_rate, 3),
                    "loader_cpu_ms_per_sample": round(cpu, 3),
                    "bare_cpu_ms_per_sample": round(base_cpu, 3),
                    "cpu_ratio": round(base_cpu / cpu, 3),
                }
            ),
            flush=True,
        )
    names = sorted({k for s in staged for k in s})
    print(
        json.dumps(
            {
                **common,
                "workers": 0,
                "stages_cpu_ms_per_sample": {k: round(median([s.get(k, 0.0) for s in staged]), 3) for k in names},
                "bare_cpu_ms_per_sample": round(base_cpu, 3),
            }
        ),
        flush=True,
    )
    if 1 in rates and 2 in rates:
        print(
            json.dumps(
                {
                    **common,
                    "two_workers_over_one": round(rates[2] / rates[1], 3),
                    "note": "wall-clock; meaningful only where 2 cores are free (see load_avg_1m and cpus)",
                }
            ),
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5, help="interleaved trials per measurement (medians are kept)")
    parser.add_argument(
        "--repeat", type=int, default=8, help="passes over the dataset per measurement (synthetic: twice)"
    )
    parser.add_argument(
        "--coco", type=Path, default=COCO_MINI, help="coco_mini folder (default: ../shared/data/coco_mini)"
    )
    parser.add_argument("--synthetic-size", type=int, default=224, help="crop size on the synthetic scenes")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=["coco384", "synthetic"], choices=["coco384", "synthetic"])
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for which in args.datasets:
            bench_dataset(
                which,
                Path(tmp),
                args.trials,
                args.workers,
                args.repeat * (2 if which == "synthetic" else 1),
                args.synthetic_size,
                args.coco,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
