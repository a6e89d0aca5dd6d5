"""data_tools/order.py against the contract of DESIGN.md 3 "Data order and resume".

Two kinds of check on many small random cases (one dataset or a weighted mixture, any layout):
exact deliveries against order_reference.py, a per-sample statement of the contract that shares no
code with order.py (after planning, same-layout resumes, consecutive re-cuts, and from format-1
cursors the oracle writes); and properties checked on order.py alone: every sample once per epoch,
the same number of batches on every rank, a resume continues exactly, a re-cut loses and repeats
nothing. Plus the arithmetic order.py is built on (mixture positions, runs)."""

from __future__ import annotations

import random
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from data_tools import order
from data_tools.errors import UserError
from data_tools.runs import decode_runs, encode_runs, take_runs
from tests.data_tools import order_reference as ref

WEIGHTS = (1.0, 1.0, 0.5, 0.3, 0.75, 1.7, 2.0, 2.5, 0.0)


def random_sources(rng: random.Random) -> list[tuple[tuple[int, ...], float]]:
    while True:
        sources = []
        for d in range(rng.choice((1, 1, 2, 2, 3))):
            shards = tuple(rng.choice((0, 1, 2, 3, 5, 7, 9, 12)) for _ in range(rng.randint(1, 6)))
            sources.append((shards, rng.choice(WEIGHTS) if d or rng.random() < 0.5 else 1.0))
        if sum(round(w * sum(s)) for s, w in sources) > 0:
            return sources


def random_layout(rng: random.Random) -> tuple[int, int, int, int]:
    return rng.randint(1, 4), rng.randint(1, 3), rng.randint(1, 5), rng.randint(1, 7)


def sha(d: int) -> str:
    return f"{d:064d}"


def mine(sources, seed: int, epoch: int) -> order.EpochList:
    return order.EpochList([order.Source(s, sha256=sha(d), weight=w) for d, (s, w) in enumerate(sources)], seed, epoch)


def samples_of(epoch_list: order.EpochList, positions) -> list[tuple]:
    where = epoch_list.locate(np.asarray(list(positions), dtype=np.int64))
    return list(zip(where.dataset.tolist(), where.repeat.tolist(), where.shard.tolist(), where.index.tolist()))


def stream_positions(plan: order.Plan, stream: int, start: int = 0) -> list[int]:
    return [p for _, block in plan.delivery(stream, start) for p in block.tolist()]


def assert_delivers_as_oracle(plan: order.Plan, cursor: dict, oracle: ref.Epoch) -> None:
    """Each stream of `plan` delivers, from its cursor position on, the oracle's samples in the oracle's order."""
    assert plan.layout.num_streams == len(oracle.deliveries)
    assert plan.batches_per_stream == oracle.batches_per_stream
    for s, delivery in enumerate(oracle.deliveries):
        start = int(cursor["streams"][s]["position"])
        assert start == oracle.positions[s]
        assert plan.stream_length(s) == len(delivery)
        expected = [oracle.samples[p] for p in delivery[start:]]
        assert samples_of(plan.epoch_list, stream_positions(plan, s, start)) == expected, f"stream {s}"


def consume(rng: random.Random, oracle: ref.Epoch, cursor: dict) -> None:
    """The same random consumption (mid-block, untouched and finished streams) in the oracle and a cursor."""
    for s, delivery in enumerate(oracle.deliveries):
        left = len(delivery) - oracle.positions[s]
        oracle.consume(s, rng.choice((0, left, rng.randint(0, left), rng.randint(0, left))))
        n, batch_size = oracle.positions[s], oracle.layout[2]
        cursor["streams"][s] = {"position": n, "batches": min(oracle.batches_per_stream, -(-n // batch_size))}


@pytest.mark.parametrize("case", range(150))
def test_plan_resume_and_recuts_deliver_what_the_contract_says(case):
    rng = random.Random(case)
    sources = random_sources(rng)
    seed, epoch = rng.randint(0, 3), rng.randint(0, 2)
    layout = random_layout(rng)
    oracle = ref.Epoch(sources, seed, epoch, layout)
    epoch_list = mine(sources, seed, epoch)
    assert samples_of(epoch_list, range(len(epoch_list))) == oracle.samples
    plan = order.Plan(epoch_list, order.Layout(*layout))
    cursor = plan.new_cursor()
    assert_delivers_as_oracle(plan, cursor, oracle)
    for _ in range(3):  # consecutive resumes: same layout or a re-cut to another one
        consume(rng, oracle, cursor)
        written = oracle.cursor([sha(d) for d in range(len(sources))])  # format 1, written from the contract
        new_layout = layout if rng.random() < 0.3 else random_layout(rng)
        if new_layout != layout:
            oracle.recut(new_layout)
        plan, cursor = order.resume(epoch_list, order.Layout(*new_layout), cursor)
        assert_delivers_as_oracle(plan, cursor, oracle)
        from_written, written_cursor = order.resume(epoch_list, order.Layout(*new_layout), written)
        assert written_cursor["format"] == order.CURSOR_FORMAT
        assert_delivers_as_oracle(from_written, written_cursor, oracle)
        layout = new_layout


def all_positions(plan: order.Plan, starts=None) -> list[int]:
    n = plan.layout.num_streams
    return [p for s in range(n) for p in stream_positions(plan, s, 0 if starts is None else starts[s])]


@pytest.mark.parametrize("case", range(300))
def test_every_sample_once_equal_batches_exact_resume_and_lossless_recuts(case):
    """Properties of order.py alone, whatever the seeded choices are."""
    rng = random.Random(10_000 + case)
    sources = random_sources(rng)
    epoch_list = mine(sources, rng.randint(0, 5), rng.randint(0, 3))
    size = len(epoch_list)
    assert size == sum(round(w * sum(s)) for s, w in sources)
    counts = Counter(d for d, *_ in samples_of(epoch_list, range(size)))
    assert all(counts[d] == round(w * sum(s)) for d, (s, w) in enumerate(sources))
    assert len(set(samples_of(epoch_list, range(size)))) == size  # no sample twice in one epoch list

    layout = order.Layout(*random_layout(rng))
    plan = order.Plan(epoch_list, layout)
    cursor = plan.new_cursor()
    consumed: list[int] = []
    for _ in range(3):
        everything = all_positions(plan)
        assert sorted(consumed + everything) == list(range(size))  # every sample once, none lost to a re-cut
        lengths = [plan.stream_length(s) for s in range(layout.num_streams)]
        assert max(lengths) - min(lengths) <= 1
        assert max(lengths) <= plan.batches_per_stream * layout.batch_size
        per_rank = [len(plan.rank_schedule(cursor, r)) for r in range(layout.world_size)]
        assert per_rank == [plan.batches_per_rank()] * layout.world_size  # no rank waits on another
        for rank in range(layout.world_size):
            assert Counter(plan.rank_schedule(cursor, rank)) == Counter(
                {rank * layout.workers + w: plan.batches_per_stream for w in range(layout.workers)}
            )

        taken = {}
        for s in range(layout.num_streams):
            taken[s] = rng.choice((0, lengths[s], rng.randint(0, lengths[s])))
            batches = min(plan.batches_per_stream, -(-taken[s] // layout.batch_size))
            cursor["streams"][s] = {"position": taken[s], "batches": batches}
        same, same_cursor = order.resume(epoch_list, layout, cursor)
        for s in range(layout.num_streams):  # a resume at the same layout continues each stream exactly
            assert stream_positions(same, s, taken[s]) == stream_positions(plan, s)[taken[s] :]
        assert same_cursor["streams"] == cursor["streams"]

        consumed += [p for s in range(layout.num_streams) for p in stream_positions(plan, s)[: taken[s]]]
        layout = order.Layout(*random_layout(rng))
        plan, cursor = order.resume(epoch_list, layout, cursor)
        left = sorted(set(range(size)) - set(consumed))
        # the unconsumed samples in epoch-list order, cut into contiguous stretches, one per stream
        assert [p for s in range(layout.num_streams) for p in sorted(stream_positions(plan, s))] == left


def test_mixture_interleave_is_the_rule_exactly_at_any_size():
    """Positions from counting equal the rule's exact order: sample k of a dataset contributing c
    sits at (k + 0.5) / c, ties to the lower dataset; beyond int64 products too."""

    def rule_position(counts, d, k):  # entries of every dataset before (d, k), in exact fractions
        f = Fraction(2 * k + 1, 2 * counts[d])
        before = k
        for e, c in enumerate(counts):
            if e != d and c:
                # j with (2j+1)/(2c) < f (<= f when e < d)
                bound = f * 2 * c
                odd = bound.__floor__() if e < d else bound.__ceil__() - 1
                before += min(max((odd + 1) // 2, 0), c)
        return before

    rng = random.Random(5)
    for counts in (
        [3, 6, 9],
        [5, 0, 7],
        [1, 1],
        [2_920_000_000, 5_850_000_000],
        [7_000_000_007, 3, 4_999_999_999, 123_456_789],
    ):
        for _ in range(200):
            d = rng.choice([i for i, c in enumerate(counts) if c])
            k = rng.randrange(counts[d])
            p = rule_position(counts, d, k)
            assert int(order.mix_position(counts, d, np.asarray([k]))[0]) == p
            got_d, got_k = order.mix_locate(counts, np.asarray([p]))
            assert (int(got_d[0]), int(got_k[0])) == (d, k)
    small = [4, 6, 10]  # and every position, once each, in increasing order
    ds, ks = order.mix_locate(small, np.arange(20))
    assert sorted(order.mix_position(small, d, np.asarray([k]))[0] for d, k in zip(ds.tolist(), ks.tolist())) == list(
        range(20)
    )


def test_remaining_runs_cost_does_not_grow_with_the_sample_count():
    """A 5-billion-sample single dataset re-cut: what is left is the base less what the streams took."""
    source = order.Source((10_000,) * 500_000, sha256="a" * 64)
    epoch_list = order.EpochList([source], 0, 0)
    plan = order.Plan(epoch_list, order.Layout(64, 2, 32, 256))
    cursor = plan.new_cursor()
    for s in range(plan.layout.num_streams):
        cursor["streams"][s] = {"position": 1000 + s, "batches": (1000 + s) // 32 + 1}
    remaining = plan.remaining_runs(cursor)
    assert int((remaining[:, 1] - remaining[:, 0]).sum()) == len(epoch_list) - sum(1000 + s for s in range(128))
    new_plan, new_cursor = order.resume(epoch_list, order.Layout(3, 1, 32, 256), cursor)
    assert decode_runs(new_cursor["base"]).tolist() == remaining.tolist()


def test_take_runs_and_base_encoding():
    base = np.asarray([[2, 5], [7, 8], [10, 20]])  # positions 2 3 4 7 10 11 ... 19
    flat = [2, 3, 4, 7] + list(range(10, 20))
    index_runs = np.asarray([[0, 2], [3, 6], [9, 14]])
    expected = [flat[i] for a, b in index_runs.tolist() for i in range(a, b)]
    got = take_runs(base, index_runs)
    assert [p for a, b in got.tolist() for p in range(a, b)] == expected
    assert got.tolist() == [[2, 4], [7, 8], [10, 12], [15, 20]]  # maximal runs
    assert decode_runs(encode_runs(base)).tolist() == base.tolist()
    assert decode_runs([[0, 4]]).tolist() == [[0, 4]]  # format 1
    broken = dict(encode_runs(base), runs=2)
    with pytest.raises(UserError, match="damaged"):
        decode_runs(broken)
    with pytest.raises(UserError, match="encoding"):
        decode_runs({"encoding": "gzip"})


def test_unknown_cursor_format_is_refused_in_one_line():
    plan = order.Plan(order.EpochList([order.Source((4, 4))], 0, 0), order.Layout(1, 1, 2, 2))
    saved = plan.new_cursor()
    saved["format"] = 3
    with pytest.raises(UserError, match=r"format=3 is not allowed: expected one of \[1, 2\]"):
        order.resume(plan.epoch_list, plan.layout, saved)
