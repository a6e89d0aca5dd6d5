"""Data order and resume of DESIGN.md 3, as pure functions over sample counts (no IO, no decoding).

Why a module of its own: the loader's worker processes, the `stream` command and the tests must
agree on exactly which sample goes where; they all call this code, and nothing here reads a file.

Cost: nothing here is linear in the number of samples. Positions are int64 numpy arrays built one
block at a time; whole ranges (the base, what a cursor consumed, what is left) are runs (runs.py);
the mixture's interleave is computed by counting (`data_tools.mixture.mix_locate`), not by sorting the epoch. So
planning, resume and re-cuts cost time and memory in the number of shards, streams and partly
consumed blocks: milliseconds to about a second at billions of samples and thousands of streams
(bench/bench_order.py). tests/data_tools/order_reference.py keeps the direct per-sample version
that the tests compare this one with.

Vocabulary:
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
  datasets' sha256 and the base (encoded compactly, runs.encode_runs; CURSOR_FORMAT 1 cursors,
  which stored it as a list of [start, end] pairs, load as well). See `resume`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterator, Sequence

import numpy as np

from data_tools.errors import UserError
from data_tools.mixture import mix_locate, mix_position  # noqa: F401  (also used from here)
from data_tools.runs import coalesce, decode_runs, encode_runs, runs_ends, take_runs
from data_tools.runs import full_runs, runs_from_positions, runs_length, runs_take  # noqa: F401  (also used from here)

CURSOR_FORMAT = 2
READABLE_CURSOR_FORMATS = (1, 2)
"""2 stores the base encoded (runs.RUNS_ENCODING); 1 stored a list of [start, end] pairs and still loads."""
_TAG_SHARDS, _TAG_BLOCK = 0x5AD5, 0xB10C
"""Distinct first words of the seed sequences, so shard permutations and block shuffles never share a stream."""
_PARTIAL_ENTRIES = 1 << 18
"""Entries of partly consumed blocks that a re-cut marks at once: a re-cut at thousands of streams has
millions of them, and marking them all in one array cost most of its peak memory."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One dataset as the order sees it: sample counts per shard (from dataset.json) and a weight."""

    shard_samples: tuple[int, ...]
    sha256: str = ""
    weight: float = 1.0

    @functools.cached_property
    def size(self) -> int:
        """Samples in the dataset (summed once: a LAION-scale dataset has 600,000 shards)."""
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
        self._perms: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._plain = len(self.sources) == 1 and self._counts[0] == self.sources[0].size

    def __len__(self) -> int:
        return int(sum(self._counts))

    def _shard_table(self, dataset: int, repeat: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(permuted shard ids, their sample counts, cumulative sample ends in that order) for one dataset
        and repeat."""
        key = (dataset, repeat)
        if key not in self._perms:
            counts = np.asarray(self.sources[dataset].shard_samples, dtype=np.int64)
            perm = shard_permutation(len(counts), self.seed, self.epoch, dataset, repeat)
            self._perms[key] = (perm, counts[perm], np.cumsum(counts[perm]))
        return self._perms[key]

    def locate(self, positions: np.ndarray) -> Located:
        """Dataset, repeat, shard and in-shard index of each epoch-list position."""
        positions = np.asarray(positions, dtype=np.int64)
        if self._plain:
            dataset = np.zeros(len(positions), dtype=np.int64)
            local = positions
        else:
            dataset, local = mix_locate(self._counts, positions)
        sizes = np.asarray([s.size for s in self.sources], dtype=np.int64)
        repeat = local // sizes[dataset]
        within = local % sizes[dataset]
        shard = np.empty(len(positions), dtype=np.int64)
        index = np.empty(len(positions), dtype=np.int64)
        for d, r in sorted(set(zip(dataset.tolist(), repeat.tolist()))):
            sel = (dataset == d) & (repeat == r)
            perm, counts, ends = self._shard_table(d, r)
            slot = np.searchsorted(ends, within[sel], side="right")  # which permuted shard
            shard[sel] = perm[slot]
            index[sel] = within[sel] - (ends[slot] - counts[slot])
        return Located(dataset, repeat, shard, index)


# --- one layout over a base ----------------------------------------------------------------------
class Plan:
    """The streams of one layout over a base, their delivery orders, and the batch schedule."""

    def __init__(self, epoch_list: EpochList, layout: Layout, base: np.ndarray | None = None):
        self.epoch_list, self.layout = epoch_list, layout
        self.base = full_runs(len(epoch_list)) if base is None else np.asarray(base, dtype=np.int64).reshape(-1, 2)
        self._base_ends = runs_ends(
            self.base
        )  # [runs], so a block's lookup is a binary search, not a pass over the base
        self._encoded_base: dict[str, Any] | None = None
        total = int(self._base_ends[-1]) if len(self.base) else 0
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
        positions = runs_take(self.base, np.arange(lo, hi, dtype=np.int64), self._base_ends)
        return positions[self._block_permutation(int(positions[0]), hi - lo)]

    def _block_permutation(self, first_position: int, length: int) -> np.ndarray:
        """Delivery order inside a block, seeded by (seed, epoch, epoch-list position of its first entry)."""
        seq = np.random.SeedSequence([_TAG_BLOCK, self.seed, self.epoch, first_position])
        return np.random.Generator(np.random.PCG64(seq)).permutation(length)

    def encoded_base(self) -> dict[str, Any]:
        """The base as a cursor stores it (encoded once per plan)."""
        if self._encoded_base is None:
            self._encoded_base = encode_runs(self.base)
        return self._encoded_base

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
            "base": self.encoded_base(),
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
        done = np.asarray([cursor["streams"][rank * k + w]["batches"] for w in range(k)], dtype=np.int64)
        offset = int(done.sum()) % k
        worker = (offset + np.arange(k)) % k  # [k] in the order the round visits them
        left = np.maximum(self.batches_per_stream - done[worker], 0)
        slot = np.repeat(np.arange(k), left)  # one entry per remaining batch
        round_ = np.arange(len(slot)) - np.repeat(np.cumsum(left) - left, left)
        return (rank * k + worker[slot[np.lexsort((slot, round_))]]).tolist()

    def worker_streams(self, cursor: dict[str, Any], rank: int) -> list[int]:
        """Stream served by each DataLoader worker of a rank, rotated so its round-robin continues the schedule."""
        k = self.layout.workers
        offset = sum(cursor["streams"][rank * k + w]["batches"] for w in range(k)) % k
        return [rank * k + (offset + w) % k for w in range(k)]

    def remaining_runs(self, cursor: dict[str, Any]) -> np.ndarray:
        """Runs of the epoch-list positions that no stream of a global cursor has consumed yet.

        Worked out as runs of base indices, then mapped through the base: per stream, what is past
        its consumed whole blocks, less the entries taken from a partly consumed block (the only
        place that looks at single entries, a bounded number of blocks at a time). Cost: streams +
        base runs + partly consumed blocks x shuffle_block in time; memory in the runs left, not in
        the entries of the partly consumed blocks.
        """
        blk, n = self.layout.shuffle_block, self.layout.num_streams
        position = np.fromiter((int(cursor["streams"][s]["position"]) for s in range(n)), dtype=np.int64, count=n)
        lo, hi = self._starts[:-1], self._starts[1:]  # [streams] base-index range of each stream
        full = np.minimum(hi, lo + (position // blk) * blk)  # whole blocks consumed up to here
        taken = position % blk
        partial = (taken > 0) & (full < hi)
        after = np.where(partial, np.minimum(hi, full + blk), full)  # untouched from here to hi
        untouched = np.stack([after, hi], axis=1)[after < hi]  # [streams with entries past their partial block, 2]
        ps = np.flatnonzero(partial)  # [partly consumed blocks], in base order
        if len(ps) == 0:
            return take_runs(self.base, coalesce(untouched), self._base_ends)
        firsts = runs_take(self.base, full[ps], self._base_ends)  # epoch-list position of each block's first entry
        rows = max(1, _PARTIAL_ENTRIES // blk)
        pieces = []
        for i in range(0, len(ps), rows):
            chunk = ps[i : i + rows]
            lengths = after[chunk] - full[chunk]
            pieces.append(self._partial_block_runs(full[chunk], lengths, taken[chunk], firsts[i : i + rows]))
        kept = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]  # [runs, 2] sorted: blocks in base order
        del pieces
        # merge the two sorted lists (each stream's untouched run follows its partial block's runs)
        index_runs = np.insert(kept, np.searchsorted(kept[:, 0], untouched[:, 0]), untouched, axis=0)
        del kept
        return take_runs(self.base, coalesce(index_runs), self._base_ends)

    def _partial_block_runs(
        self, starts: np.ndarray, lengths: np.ndarray, taken: np.ndarray, firsts: np.ndarray
    ) -> np.ndarray:
        """Runs of base indices left in partly consumed blocks: block b covers base indices
        [starts[b], starts[b] + lengths[b]), of which its first taken[b] entries in delivery order
        are consumed; firsts[b] is the epoch-list position of its first entry (its shuffle's seed)."""
        blk = self.layout.shuffle_block
        kept = np.zeros((len(starts), blk + 1), dtype=bool)  # [blocks, blk + 1]: a False column ends each row's runs
        kept[:, :blk] = np.arange(blk) < lengths[:, None]
        for row, (first, length, count) in enumerate(zip(firsts.tolist(), lengths.tolist(), taken.tolist())):
            kept[row, self._block_permutation(first, length)[:count]] = False
        edges = np.diff(kept.reshape(-1).view(np.int8), prepend=np.int8(0))  # +1 where a run starts, -1 past it
        del kept
        run_starts, run_ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)  # flat, a run's in one row
        row = run_starts // (blk + 1)
        offset = starts[row] - row * (blk + 1)  # flat index -> base index
        return np.stack([run_starts + offset, run_ends + offset], axis=1)


def check_cursor(cursor: dict[str, Any], epoch_list: EpochList) -> None:
    """Refuse a cursor that belongs to other data or another seed, with one clear line."""
    if not isinstance(cursor, dict) or cursor.get("format") not in READABLE_CURSOR_FORMATS:
        shown = cursor.get("format") if isinstance(cursor, dict) else cursor
        raise UserError(f"cursor: format={shown!r} is not allowed: expected one of {list(READABLE_CURSOR_FORMATS)}")
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
    old = Plan(epoch_list, Layout(**cursor["layout"]), decode_runs(cursor["base"]))
    if old.layout == layout:
        # a format-1 cursor continues as format 2: same streams, base re-encoded
        return old, {
            **cursor,
            "format": CURSOR_FORMAT,
            "base": old.encoded_base(),
            "streams": [dict(s) for s in cursor["streams"]],
        }
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
