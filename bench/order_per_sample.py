"""The per-sample data order: the baseline bench/bench_order.py measures data_tools/order.py against.

It materialises every epoch-list position as an int64 array (slow and memory-hungry at scale, but
the direct way to do it), so the benchmark shows what the runs arithmetic of order.py saves. It
writes CURSOR_FORMAT 1 cursors (the base as a list of [start, end] pairs). It is not a test oracle:
tests/data_tools/order_reference.py states the contract independently.

Vocabulary (positions are int64 numpy arrays, so million-sample epochs stay vectorised):
- epoch list: the samples of one epoch in order. One dataset: its shards permuted by
  (seed, epoch), samples in stored order. A weighted mixture: each dataset contributes
  round(weight x size) samples (weights above 1 repeat the dataset with a fresh shard
  permutation per repeat; below 1 take the first part of that epoch's order), interleaved
  deterministically so that each dataset is spread evenly over the list (sample k of a dataset
  contributing c samples sits at fraction (k + 0.5) / c; ties go to the lower dataset index).
- base: the part of the epoch list that the current layout cuts, as sorted runs [start, end) of
  epoch-list positions. A fresh epoch's base is the whole list; after resuming at another layout
  it is what was not consumed yet.
- stream: stream `rank * workers + worker` is a contiguous, near-equal range of the base (the first
  `len % streams` streams get one more). It is delivered block by block: consecutive blocks of
  `shuffle_block` entries, each permuted by a generator seeded with (seed, epoch, the epoch-list
  position of the block's first entry).
- cursor: per stream, `position` (entries of its delivery order already consumed by the trainer,
  bad ones included) and `batches` (batches it delivered), with the layout, seed, epoch, the
  datasets' sha256 and the base. See `Plan.resume`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Sequence

import numpy as np

from data_tools.errors import UserError

CURSOR_FORMAT = 1
_TAG_SHARDS, _TAG_BLOCK = 0x5AD5, 0xB10C
"""Distinct first words of the seed sequences, so shard permutations and block shuffles never share a stream."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One dataset as the order sees it: sample counts per shard (from dataset.json) and a weight."""

    shard_samples: tuple[int, ...]
    sha256: str = ""
    weight: float = 1.0

    @property
    def size(self) -> int:
        return int(sum(self.shard_samples))

    @property
    def contribution(self) -> int:
        """Samples this dataset contributes to one epoch: round(weight x size)."""
        return int(round(self.weight * self.size))


@dataclasses.dataclass(frozen=True)
class Layout:
    """How an epoch is cut: world_size x workers streams, batches of batch_size per rank."""

    world_size: int
    workers: int
    """Streams per rank (a loader with 0 worker processes still has one stream per rank)."""
    batch_size: int
    shuffle_block: int

    def __post_init__(self) -> None:
        for name in ("world_size", "workers", "batch_size", "shuffle_block"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"layout: {name}={getattr(self, name)!r} is not allowed: expected an integer >= 1")

    @property
    def num_streams(self) -> int:
        return self.world_size * self.workers

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# --- the epoch list ------------------------------------------------------------------------------
def shard_permutation(num_shards: int, seed: int, epoch: int, dataset: int = 0, repeat: int = 0) -> np.ndarray:
    """The shard order of one dataset (and repeat) in one epoch."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_TAG_SHARDS, seed, epoch, dataset, repeat])))
    return rng.permutation(num_shards)


@dataclasses.dataclass
class Located:
    """Where epoch-list entries live: arrays of equal length."""

    dataset: np.ndarray
    repeat: np.ndarray
    shard: np.ndarray
    index: np.ndarray
    """Sample index inside its shard (stored order)."""


class EpochList:
    """The epoch's sample list over one dataset or a weighted mixture (see module docstring)."""

    def __init__(self, sources: Sequence[Source], seed: int, epoch: int):
        if not sources:
            raise UserError("data: no dataset given")
        self.sources, self.seed, self.epoch = list(sources), int(seed), int(epoch)
        self._counts = [s.contribution for s in self.sources]
        self._perms: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        plain = len(self.sources) == 1 and self._counts[0] == self.sources[0].size
        if plain:
            self._mix_dataset = self._mix_local = None
        else:
            ids = np.concatenate([np.full(c, d, dtype=np.int32) for d, c in enumerate(self._counts)])
            local = np.concatenate([np.arange(c, dtype=np.int64) for c in self._counts])
            frac = np.concatenate([(np.arange(c) + 0.5) / max(c, 1) for c in self._counts])
            order = np.lexsort((ids, frac))  # by fraction, ties by dataset index
            self._mix_dataset, self._mix_local = ids[order], local[order]

    def __len__(self) -> int:
        return int(sum(self._counts))

    def _shard_table(self, dataset: int, repeat: int) -> tuple[np.ndarray, np.ndarray]:
        """(permuted shard ids, cumulative sample ends in that order) for one dataset and repeat."""
        key = (dataset, repeat)
        if key not in self._perms:
            counts = np.asarray(self.sources[dataset].shard_samples, dtype=np.int64)
            perm = shard_permutation(len(counts), self.seed, self.epoch, dataset, repeat)
            self._perms[key] = (perm, np.cumsum(counts[perm]))
        return self._perms[key]

    def locate(self, positions: np.ndarray) -> Located:
        """Dataset, repeat, shard and in-shard index of each epoch-list position."""
        positions = np.asarray(positions, dtype=np.int64)
        if self._mix_dataset is None:
            dataset = np.zeros(len(positions), dtype=np.int64)
            local = positions
        else:
            dataset = self._mix_dataset[positions].astype(np.int64)
            local = self._mix_local[positions]
        sizes = np.asarray([s.size for s in self.sources], dtype=np.int64)
        repeat = local // sizes[dataset]
        within = local % sizes[dataset]
        shard = np.empty(len(positions), dtype=np.int64)
        index = np.empty(len(positions), dtype=np.int64)
        for d, r in sorted(set(zip(dataset.tolist(), repeat.tolist()))):
            sel = (dataset == d) & (repeat == r)
            perm, ends = self._shard_table(d, r)
            slot = np.searchsorted(ends, within[sel], side="right")  # which permuted shard
            shard[sel] = perm[slot]
            index[sel] = within[sel] - (ends[slot] - np.asarray(self.sources[d].shard_samples)[perm[slot]])
        return Located(dataset, repeat, shard, index)


# --- runs of positions ---------------------------------------------------------------------------
def full_runs(length: int) -> np.ndarray:
    return np.asarray([[0, length]] if length else np.zeros((0, 2)), dtype=np.int64).reshape(-1, 2)


def runs_length(runs: np.ndarray) -> int:
    return int((runs[:, 1] - runs[:, 0]).sum())


def runs_take(runs: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Epoch-list positions of the given indices into the list that `runs` describe."""
    lengths = runs[:, 1] - runs[:, 0]
    ends = np.cumsum(lengths)
    slot = np.searchsorted(ends, indices, side="right")
    return runs[slot, 0] + indices - (ends[slot] - lengths[slot])


def runs_from_positions(positions: np.ndarray) -> np.ndarray:
    """Sorted, distinct positions -> runs [start, end)."""
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = positions[np.concatenate([[0], breaks])]
    ends = positions[np.concatenate([breaks - 1, [len(positions) - 1]])] + 1
    return np.stack([starts, ends], axis=1)


# --- one layout over a base ----------------------------------------------------------------------
class Plan:
    """The streams of one layout over a base, their delivery orders, and the batch schedule."""

    def __init__(self, epoch_list: EpochList, layout: Layout, base: np.ndarray | None = None):
        self.epoch_list, self.layout = epoch_list, layout
        self.base = full_runs(len(epoch_list)) if base is None else np.asarray(base, dtype=np.int64).reshape(-1, 2)
        total = runs_length(self.base)
        n = layout.num_streams
        sizes = np.full(n, total // n, dtype=np.int64)
        sizes[: total % n] += 1
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self.batches_per_stream = math.ceil(int(sizes.max()) / layout.batch_size) if total else 0
        """Every stream delivers this many batches (the short ones fill theirs with padding slots)."""

    @property
    def seed(self) -> int:
        return self.epoch_list.seed

    @property
    def epoch(self) -> int:
        return self.epoch_list.epoch

    def stream_length(self, stream: int) -> int:
        return int(self._starts[stream + 1] - self._starts[stream])

    def batches_per_rank(self) -> int:
        return self.batches_per_stream * self.layout.workers

    def block(self, stream: int, block: int) -> np.ndarray:
        """Epoch-list positions of one block of a stream, in delivery (shuffled) order."""
        blk = self.layout.shuffle_block
        lo = int(self._starts[stream]) + block * blk
        hi = min(lo + blk, int(self._starts[stream + 1]))
        positions = runs_take(self.base, np.arange(lo, hi, dtype=np.int64))
        seq = np.random.SeedSequence([_TAG_BLOCK, self.seed, self.epoch, int(positions[0])])
        return positions[np.random.Generator(np.random.PCG64(seq)).permutation(hi - lo)]

    def delivery(self, stream: int, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(stream offset of the first entry, positions) per block from `start` on, in delivery order."""
        blk, length = self.layout.shuffle_block, self.stream_length(stream)
        for b in range(start // blk, math.ceil(length / blk)):
            positions = self.block(stream, b)
            skip = max(0, start - b * blk)
            yield b * blk + skip, positions[skip:]

    # --- cursors ---------------------------------------------------------------------------------
    def new_cursor(self, rank: int | None = None) -> dict[str, Any]:
        """The cursor before any batch: every stream at position 0 (only this rank's streams if rank is given)."""
        k = self.layout.workers
        mine = range(self.layout.num_streams) if rank is None else range(rank * k, rank * k + k)
        streams: list[dict[str, int] | None] = [None] * self.layout.num_streams
        for s in mine:
            streams[s] = {"position": 0, "batches": 0}
        cursor = {
            "format": CURSOR_FORMAT,
            "seed": self.seed,
            "epoch": self.epoch,
            "datasets": [{"sha256": s.sha256, "samples": s.size, "weight": s.weight} for s in self.epoch_list.sources],
            "layout": self.layout.to_json(),
            "base": self.base.tolist(),
            "streams": streams,
        }
        if rank is not None:
            cursor["rank"] = rank
        return cursor

    def rank_schedule(self, cursor: dict[str, Any], rank: int) -> list[int]:
        """The streams that deliver this rank's remaining batches, in order.

        Round-robin over the rank's streams starting after the last one used, skipping exhausted
        ones: exactly the order of a torch DataLoader whose worker w serves stream
        `rank * workers + (offset + w) % workers` (see `worker_streams`).
        """
        k = self.layout.workers
        done = [cursor["streams"][rank * k + w]["batches"] for w in range(k)]
        left = [self.batches_per_stream - d for d in done]
        offset = sum(done) % k
        order: list[int] = []
        while any(left):
            for i in range(k):
                w = (offset + i) % k
                if left[w] > 0:
                    order.append(rank * k + w)
                    left[w] -= 1
        return order

    def worker_streams(self, cursor: dict[str, Any], rank: int) -> list[int]:
        """Stream served by each DataLoader worker of a rank, rotated so its round-robin continues the schedule."""
        k = self.layout.workers
        offset = sum(cursor["streams"][rank * k + w]["batches"] for w in range(k)) % k
        return [rank * k + (offset + w) % k for w in range(k)]

    def remaining_runs(self, cursor: dict[str, Any]) -> np.ndarray:
        """Runs of the epoch-list positions that no stream of a global cursor has consumed yet."""
        blk = self.layout.shuffle_block
        keep: list[np.ndarray] = []
        for s in range(self.layout.num_streams):
            position = int(cursor["streams"][s]["position"])
            lo, hi = int(self._starts[s]), int(self._starts[s + 1])
            full = min(hi, lo + (position // blk) * blk)  # whole blocks consumed up to here
            partial_hi = min(hi, full + blk)
            if position % blk and full < hi:
                taken = set(self.block(s, (full - lo) // blk)[: position % blk].tolist())
                block_positions = runs_take(self.base, np.arange(full, partial_hi, dtype=np.int64))
                keep.append(np.asarray([p for p in block_positions.tolist() if p not in taken], dtype=np.int64))
                keep.append(runs_take(self.base, np.arange(partial_hi, hi, dtype=np.int64)))
            else:
                keep.append(runs_take(self.base, np.arange(full, hi, dtype=np.int64)))
        flat = np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)
        return runs_from_positions(np.sort(flat))


def check_cursor(cursor: dict[str, Any], epoch_list: EpochList) -> None:
    """Refuse a cursor that belongs to other data or another seed, with one clear line."""
    if not isinstance(cursor, dict) or cursor.get("format") != CURSOR_FORMAT:
        raise UserError(
            f"cursor: format={cursor.get('format') if isinstance(cursor, dict) else cursor!r} is not allowed: "
            f"expected {CURSOR_FORMAT}"
        )
    if int(cursor["seed"]) != epoch_list.seed:
        raise UserError(f"cursor: seed={cursor['seed']} does not match the configured seed {epoch_list.seed}")
    mine = [{"sha256": s.sha256, "samples": s.size, "weight": s.weight} for s in epoch_list.sources]
    theirs = [
        {"sha256": d["sha256"], "samples": int(d["samples"]), "weight": float(d["weight"])} for d in cursor["datasets"]
    ]
    if theirs != mine:
        raise UserError(f"cursor: datasets={theirs} do not match the configured datasets {mine}")
    missing = [i for i, s in enumerate(cursor["streams"]) if s is None]
    if missing:
        raise UserError(
            f"cursor: streams {missing} have no state: merge every rank's cursor (merge_rank_cursors) before saving"
        )


def resume(epoch_list: EpochList, layout: Layout, cursor: dict[str, Any]) -> tuple[Plan, dict[str, Any]]:
    """The plan and global cursor to continue a saved global cursor under `layout`.

    Same layout (world size, workers, batch size, shuffle block): the same plan and the cursor as
    saved, so every stream continues exactly. Another layout: the entries not consumed yet, in
    epoch-list order, become the new base, cut into the new layout's streams from position 0.
    """
    check_cursor(cursor, epoch_list)
    old = Plan(epoch_list, Layout(**cursor["layout"]), np.asarray(cursor["base"], dtype=np.int64))
    if old.layout == layout:
        return old, {**cursor, "streams": [dict(s) for s in cursor["streams"]]}
    plan = Plan(epoch_list, layout, old.remaining_runs(cursor))
    return plan, plan.new_cursor()


def merge_rank_cursors(rank_cursors: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One global cursor from each rank's latest cursor (the trainer all-gathers them, then saves this)."""
    if not rank_cursors:
        raise ValueError("merge_rank_cursors: no cursors")
    first = rank_cursors[0]
    merged = {k: v for k, v in first.items() if k not in ("rank", "streams")}
    streams: list[dict[str, int] | None] = [None] * len(first["streams"])
    for cur in rank_cursors:
        for key in ("seed", "epoch", "layout", "base", "datasets"):
            if cur[key] != first[key]:
                raise ValueError(
                    f"merge_rank_cursors: rank {cur.get('rank')} has {key}={cur[key]!r}, "
                    f"rank {first.get('rank')} {first[key]!r}"
                )
        for s, state in enumerate(cur["streams"]):
            if state is not None:
                streams[s] = dict(state)
    merged["streams"] = streams
    return merged


# --- per-sample randomness -----------------------------------------------------------------------
def sample_seed(seed: int, epoch: int, key: str, purpose: str, repeat: int = 0) -> int:
    """A 63-bit seed from (seed, epoch, key) and the purpose (crop, caption, mlm...), so per-sample
    randomness does not depend on which rank or worker reads the sample, and adding a new random
    choice does not shift the others. A mixture that repeats a dataset within one epoch adds the
    repeat number, so a repeated sample gets a fresh crop."""
    import hashlib

    tail = f":{repeat}" if repeat else ""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{purpose}:{key}{tail}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
