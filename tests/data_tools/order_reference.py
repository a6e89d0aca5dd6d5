"""DESIGN.md 3 "Data order and resume", written the slow, obvious way: the oracle for data_tools/order.py.

Nothing here comes from order.py. Every epoch is a Python list of samples, each sample the tuple
(dataset, repeat, shard, index in shard); streams, blocks, consumption and re-cuts are list slices.
The contract leaves three choices open; this file states each one as order.py documents it:

- the seeded permutations: numpy's `Generator(PCG64(SeedSequence(words))).permutation(n)`, with
  words `[SHARD_TAG, seed, epoch, dataset, repeat]` for a dataset's shard order and
  `[BLOCK_TAG, seed, epoch, epoch-list position of the block's first entry]` for a block;
- "near-equal" ranges: the first `len % streams` streams get one sample more;
- the mixture's interleave: sample k of a dataset contributing c samples sits at (k + 0.5) / c,
  ties to the lower dataset.

Positions: the index of a sample in the epoch list. A cursor (what order.py resumes from) is built
here from the contract's words: per stream the samples consumed, with layout, seed, epoch, datasets
and, in the oldest format order.py still reads (1), the base as [start, end] pairs.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

SHARD_TAG, BLOCK_TAG = 0x5AD5, 0xB10C


def seeded_permutation(n: int, *words: int) -> list[int]:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(words)))).permutation(n).tolist()


def dataset_order(shards: tuple[int, ...], seed: int, epoch: int, dataset: int, repeat: int) -> list[tuple]:
    """One pass over a dataset: its shards permuted by (seed, epoch, dataset, repeat), samples in stored order."""
    return [
        (dataset, repeat, shard, i)
        for shard in seeded_permutation(len(shards), SHARD_TAG, seed, epoch, dataset, repeat)
        for i in range(shards[shard])
    ]


def epoch_list(sources: list[tuple[tuple[int, ...], float]], seed: int, epoch: int) -> list[tuple]:
    """Every dataset contributes round(weight x size) samples: whole passes with fresh shard orders, then the
    first part of one more; the contributions are merged by each sample's fraction (k + 0.5) / c."""
    keyed = []
    for d, (shards, weight) in enumerate(sources):
        count = round(weight * sum(shards))
        mine: list[tuple] = []
        repeat = 0
        while len(mine) < count:
            mine += dataset_order(shards, seed, epoch, d, repeat)
            repeat += 1
        keyed += [(Fraction(2 * k + 1, 2 * count), d, sample) for k, sample in enumerate(mine[:count])]
    return [sample for _, _, sample in sorted(keyed, key=lambda t: (t[0], t[1]))]


def cut(base: list[int], streams: int) -> list[list[int]]:
    """`streams` contiguous ranges of the base (epoch-list positions), near-equal, the longer ones first."""
    out, start = [], 0
    for s in range(streams):
        length = len(base) // streams + (1 if s < len(base) % streams else 0)
        out.append(base[start : start + length])
        start += length
    return out


def deliver(stream: list[int], shuffle_block: int, seed: int, epoch: int) -> list[int]:
    """A stream's range, each consecutive block shuffled by (seed, epoch, position of its first entry)."""
    out = []
    for b in range(0, len(stream), shuffle_block):
        block = stream[b : b + shuffle_block]
        out += [block[i] for i in seeded_permutation(len(block), BLOCK_TAG, seed, epoch, block[0])]
    return out


class Epoch:
    """One epoch under a sequence of layouts: the streams' deliveries, what was consumed, and re-cuts."""

    def __init__(self, sources, seed: int, epoch: int, layout: tuple[int, int, int, int]):
        self.sources, self.seed, self.epoch = sources, seed, epoch
        self.samples = epoch_list(sources, seed, epoch)
        self.consumed: list[int] = []  # positions consumed under earlier layouts, in no particular order
        self.start(list(range(len(self.samples))), layout)

    def start(self, base: list[int], layout: tuple[int, int, int, int]) -> None:
        self.base, self.layout = base, layout
        world, workers, batch_size, block = layout
        self.deliveries = [deliver(s, block, self.seed, self.epoch) for s in cut(base, world * workers)]
        longest = max((len(d) for d in self.deliveries), default=0)
        self.batches_per_stream = math.ceil(longest / batch_size)
        self.positions = [0] * len(self.deliveries)

    def consume(self, stream: int, count: int) -> list[int]:
        """The trainer consumed the stream's next `count` samples (in delivery order)."""
        taken = self.deliveries[stream][self.positions[stream] : self.positions[stream] + count]
        self.positions[stream] += len(taken)
        return taken

    def remaining(self) -> list[int]:
        """Positions not consumed by any stream, in epoch-list order."""
        gone = set(self.consumed) | {p for d, n in zip(self.deliveries, self.positions) for p in d[:n]}
        return [p for p in range(len(self.samples)) if p not in gone]

    def recut(self, layout: tuple[int, int, int, int]) -> None:
        """Resume at another layout: the unconsumed samples, in epoch-list order, cut anew."""
        remaining = self.remaining()
        self.consumed = [p for p in range(len(self.samples)) if p not in set(remaining)]
        self.start(remaining, layout)

    def cursor(self, sha256s: list[str]) -> dict:
        """A global cursor of this state as DESIGN.md 3 describes it, in format 1 (base as [start, end] pairs)."""
        world, workers, batch_size, block = self.layout
        pairs: list[list[int]] = []
        for p in self.base:
            if pairs and pairs[-1][1] == p:
                pairs[-1][1] = p + 1
            else:
                pairs.append([p, p + 1])
        return {
            "format": 1,
            "seed": self.seed,
            "epoch": self.epoch,
            "datasets": [{"sha256": h, "samples": sum(s), "weight": w} for h, (s, w) in zip(sha256s, self.sources)],
            "layout": {"world_size": world, "workers": workers, "batch_size": batch_size, "shuffle_block": block},
            "base": pairs,
            "streams": [
                {"position": n, "batches": min(self.batches_per_stream, -(-n // batch_size))} for n in self.positions
            ],
        }
