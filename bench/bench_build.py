"""Build benchmark: images/s of `python -m data_tools build coco --resize` at 1 and 2 workers against a
bare PIL loop (read, decode, resize, encode JPEG) over the same files, measured in the same run.

The ratio (build / bare loop) is the figure: what the builder's extra work costs (dedup hashing,
validation, tar writing, manifest, progress) per image, and what its worker processes gain back.
Input: ../shared/data/coco_mini (train2017 + val2017) when present, else generated 640x480 JPEGs in a
COCO layout. Prints one JSON object per measurement.

    python bench/bench_build.py [--resize 256] [--repeats 3] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
COCO_MINI = REPO.parent / "shared" / "data" / "coco_mini"


def generated_coco(root: Path, count: int = 240, seed: int = 0) -> tuple[Path, list[str]]:
    """A COCO layout of smooth random 640x480 JPEGs (photo-like sizes: ~30-60 KB)."""
    rng = np.random.default_rng(seed)
    images_dir = root / "images" / "train2017"
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    for i in range(count):
        coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((640, 480), Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 12, size=(480, 640, 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8))
        name = f"{i + 1:012d}.jpg"
        image.save(images_dir / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "width": 640, "height": 480})
        annotations.append({"id": i + 1, "image_id": i + 1, "caption": f"generated picture number {i}"})
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_train2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations})
    )
    return root, ["train2017"]


def image_files(root: Path, splits: list[str]) -> list[Path]:
    return sorted(p for split in splits for p in (root / "images" / split).glob("*.jpg"))


def bare_loop(files: list[Path], max_side: int, quality: int) -> float:
    """Seconds for read + decode + resize + encode of every file, one process: the baseline."""
    start = time.perf_counter()
    for path in files:
        image = Image.open(io.BytesIO(path.read_bytes()))
        image = image.convert("RGB") if image.mode != "RGB" else image
        ratio = max_side / max(image.size)
        if ratio < 1:
            image = image.resize(
                (max(1, round(image.width * ratio)), max(1, round(image.height * ratio))),
                Image.Resampling.BICUBIC,
                reducing_gap=3.0,
            )
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality)
    return time.perf_counter() - start


def build_once(root: Path, splits: list[str], out: Path, max_side: int, quality: int, workers: int) -> float:
    """Seconds for a complete `build coco` of every split (same files as the bare loop)."""
    from data_tools.__main__ import main

    start = time.perf_counter()
    for split in splits:
        code = main(
            [
                "build",
                "coco",
                str(root),
                "--split",
                split,
                "--out",
                str(out / split),
                "--resize",
                str(max_side),
                "--quality",
                str(quality),
                "--shard-samples",
                "32",
                "--workers",
                str(workers),
            ]
        )
        assert code == 0, code
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if (COCO_MINI / "annotations").is_dir():
            root, splits, source = COCO_MINI, ["train2017", "val2017"], "coco_mini"
        else:
            (root, splits), source = generated_coco(tmp / "input"), "generated"
        files = image_files(root, splits)
        bare_loop(files, args.resize, args.quality)  # warm the page cache
        # interleaved repeats (baseline, then each worker count), best of each: load on a shared
        # machine drifts, and interleaving exposes every measurement to the same drift
        base_times: list[float] = []
        build_times: dict[int, list[float]] = {w: [] for w in args.workers}
        for r in range(args.repeats):
            base_times.append(bare_loop(files, args.resize, args.quality))
            for workers in args.workers:
                build_times[workers].append(
                    build_once(root, splits, tmp / f"out-{workers}-{r}", args.resize, args.quality, workers)
                )
        baseline = len(files) / min(base_times)
        print(
            json.dumps(
                {
                    "bench": "build_baseline_pil_loop",
                    "source": source,
                    "images": len(files),
                    "resize": args.resize,
                    "images_per_s": round(baseline, 2),
                }
            ),
            flush=True,
        )
        for workers in args.workers:
            rate = len(files) / min(build_times[workers])
            print(
                json.dumps(
                    {
                        "bench": "build_coco_resize",
                        "source": source,
                        "workers": workers,
                        "images": len(files),
                        "resize": args.resize,
                        "images_per_s": round(rate, 2),
                        "baseline_images_per_s": round(baseline, 2),
                        "ratio": round(rate / baseline, 3),
                    }
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
