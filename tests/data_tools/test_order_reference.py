"""order.py (runs arithmetic, counting interleave) against order_reference.py (today's per-sample
implementation) on many small random cases: the exact positions every stream delivers, block by
block, after planning, same-layout resume, elastic re-cuts (consecutive ones too) and in weighted
mixtures; and format-1 cursors written by the reference load into order.py with the same result."""
from __future__ import annotations

import random
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


def both(sources, seed: int, epoch: int):
    mine = order.EpochList([order.Source(s, sha256=f"{d:064d}", weight=w) for d, (s, w) in enumerate(sources)], seed, epoch)
    theirs = ref.EpochList([ref.Source(s, sha256=f"{d:064d}", weight=w) for d, (s, w) in enumerate(sources)], seed, epoch)
    return mine, theirs


def random_layout(rng: random.Random) -> tuple[int, int, int, int]:
    return rng.randint(1, 4), rng.randint(1, 3), rng.randint(1, 5), rng.randint(1, 7)


def delivered(plan, stream: int, start: int = 0) -> list[tuple[int, list[int]]]:
    return [(offset, positions.tolist()) for offset, positions in plan.delivery(stream, start)]


def assert_same_plans(mine: order.Plan, theirs: ref.Plan, cursor_mine: dict, cursor_theirs: dict) -> None:
    assert mine.base.tolist() == theirs.base.tolist()
    assert mine.batches_per_stream == theirs.batches_per_stream
    for s in range(mine.layout.num_streams):
        assert mine.stream_length(s) == theirs.stream_length(s)
        start = int(cursor_mine["streams"][s]["position"])
        assert start == int(cursor_theirs["streams"][s]["position"])
        assert delivered(mine, s, start) == delivered(theirs, s, start), f"stream {s}"
    for rank in range(mine.layout.world_size):
        assert mine.rank_schedule(cursor_mine, rank) == theirs.rank_schedule(cursor_theirs, rank)
        assert mine.worker_streams(cursor_mine, rank) == theirs.worker_streams(cursor_theirs, rank)


def consume_randomly(rng: random.Random, plan, cursors: list[dict]) -> None:
    """The same random consumption (mid-block positions, some streams untouched or done) in each cursor."""
    for s in range(plan.layout.num_streams):
        length = plan.stream_length(s)
        position = rng.choice((0, length, rng.randint(0, length), rng.randint(0, length)))
        batches = min(plan.batches_per_stream, -(-position // plan.layout.batch_size))
        for cursor in cursors:
            cursor["streams"][s] = {"position": position, "batches": batches}


@pytest.mark.parametrize("case", range(150))
def test_plan_resume_and_recuts_deliver_exactly_what_the_reference_does(case):
    rng = random.Random(case)
    sources = random_sources(rng)
    seed, epoch = rng.randint(0, 3), rng.randint(0, 2)
    mine_list, their_list = both(sources, seed, epoch)
    assert len(mine_list) == len(their_list)
    everything = np.arange(len(their_list))
    a, b = mine_list.locate(everything), their_list.locate(everything)
    for field in ("dataset", "repeat", "shard", "index"):
        assert getattr(a, field).tolist() == getattr(b, field).tolist(), field

    layout = random_layout(rng)
    mine = order.Plan(mine_list, order.Layout(*layout))
    theirs = ref.Plan(their_list, ref.Layout(*layout))
    cursor_mine, cursor_theirs = mine.new_cursor(), theirs.new_cursor()
    assert_same_plans(mine, theirs, cursor_mine, cursor_theirs)

    for _ in range(3):  # consecutive resumes: same layout or a re-cut to another one
        consume_randomly(rng, theirs, [cursor_mine, cursor_theirs])
        new_layout = layout if rng.random() < 0.3 else random_layout(rng)
        mine, cursor_mine = order.resume(mine_list, order.Layout(*new_layout), cursor_mine)
        theirs, cursor_theirs = ref.resume(their_list, ref.Layout(*new_layout), cursor_theirs)
        assert_same_plans(mine, theirs, cursor_mine, cursor_theirs)
        assert decode_runs(cursor_mine["base"]).tolist() == cursor_theirs["base"]
        assert cursor_mine["streams"] == cursor_theirs["streams"]
        layout = new_layout


@pytest.mark.parametrize("case", range(40))
def test_format_1_cursors_written_today_load_with_the_same_result(case):
    rng = random.Random(1000 + case)
    sources = random_sources(rng)
    mine_list, their_list = both(sources, 1, 0)
    layout = random_layout(rng)
    theirs = ref.Plan(their_list, ref.Layout(*layout))
    saved = theirs.new_cursor()
    consume_randomly(rng, theirs, [saved])
    if rng.random() < 0.5:  # a base with holes, as a re-cut leaves it
        theirs, saved = ref.resume(their_list, ref.Layout(*random_layout(rng)), saved)
        consume_randomly(rng, theirs, [saved])
    assert saved["format"] == 1 and isinstance(saved["base"], list)
    new_layout = layout if rng.random() < 0.5 else random_layout(rng)
    mine, cursor_mine = order.resume(mine_list, order.Layout(*new_layout), dict(saved))
    theirs, cursor_theirs = ref.resume(their_list, ref.Layout(*new_layout), saved)
    assert cursor_mine["format"] == order.CURSOR_FORMAT
    assert_same_plans(mine, theirs, cursor_mine, cursor_theirs)


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
                odd = (bound.__floor__() if e < d else bound.__ceil__() - 1)
                before += min(max((odd + 1) // 2, 0), c)
        return before

    rng = random.Random(5)
    for counts in ([3, 6, 9], [5, 0, 7], [1, 1], [2_920_000_000, 5_850_000_000], [7_000_000_007, 3, 4_999_999_999, 123_456_789]):
        for _ in range(200):
            d = rng.choice([i for i, c in enumerate(counts) if c])
            k = rng.randrange(counts[d])
            p = rule_position(counts, d, k)
            assert int(order.mix_position(counts, d, np.asarray([k]))[0]) == p
            got_d, got_k = order.mix_locate(counts, np.asarray([p]))
            assert (int(got_d[0]), int(got_k[0])) == (d, k)
    small = [4, 6, 10]  # and every position, once each, in increasing order
    ds, ks = order.mix_locate(small, np.arange(20))
    assert sorted(order.mix_position(small, d, np.asarray([k]))[0] for d, k in zip(ds.tolist(), ks.tolist())) == list(range(20))


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
