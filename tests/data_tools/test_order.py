"""The data order of DESIGN.md 3 as pure functions: exactly once, near-equal streams, block shuffles,
equal batch counts, cursor re-cuts (none skipped, none repeated), mixtures and the round-robin
schedule. No files: sample counts only."""

from __future__ import annotations

import numpy as np
import pytest

from data_tools import order
from data_tools.errors import UserError
from data_tools.runs import decode_runs

UNEVEN = order.Source((7, 3, 11, 1, 9), sha256="a" * 64)  # 31 samples in uneven shards


def delivered(plan: order.Plan, stream: int, start: int = 0) -> np.ndarray:
    parts = [p for _, p in plan.delivery(stream, start)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def all_delivered(plan: order.Plan) -> np.ndarray:
    return np.concatenate([delivered(plan, s) for s in range(plan.layout.num_streams)])


@pytest.mark.parametrize("world,workers,batch,block", [(1, 1, 4, 256), (2, 2, 3, 4), (3, 1, 5, 2), (4, 3, 2, 1)])
def test_every_sample_exactly_once_in_near_equal_streams(world, workers, batch, block):
    plan = order.Plan(order.EpochList([UNEVEN], seed=3, epoch=1), order.Layout(world, workers, batch, block))
    everything = all_delivered(plan)
    assert sorted(everything.tolist()) == list(range(31))
    lengths = [plan.stream_length(s) for s in range(plan.layout.num_streams)]
    assert max(lengths) - min(lengths) <= 1 and sum(lengths) == 31
    assert plan.batches_per_stream == -(-max(lengths) // batch)
    # every stream is a contiguous range of the epoch list, shuffled only inside its blocks
    for s in range(plan.layout.num_streams):
        got = delivered(plan, s)
        if len(got):
            assert sorted(got.tolist()) == list(range(got.min(), got.max() + 1))
            for b in range(0, len(got), block):
                chunk = got[b : b + block]
                assert sorted(chunk.tolist()) == list(range(got.min() + b, got.min() + b + len(chunk)))


def test_epoch_list_is_shards_permuted_with_samples_in_stored_order():
    epoch_list = order.EpochList([UNEVEN], seed=5, epoch=2)
    where = epoch_list.locate(np.arange(31))
    perm = order.shard_permutation(5, 5, 2)
    expected = [(s, i) for s in perm.tolist() for i in range(UNEVEN.shard_samples[s])]
    assert list(zip(where.shard.tolist(), where.index.tolist())) == expected
    other = order.EpochList([UNEVEN], seed=5, epoch=3).locate(np.arange(31))
    assert where.shard.tolist() != other.shard.tolist()  # a new epoch permutes the shards anew


def test_order_is_deterministic_and_seeded():
    layout = order.Layout(2, 2, 4, 3)
    a = all_delivered(order.Plan(order.EpochList([UNEVEN], 1, 0), layout))
    b = all_delivered(order.Plan(order.EpochList([UNEVEN], 1, 0), layout))
    c = all_delivered(order.Plan(order.EpochList([UNEVEN], 2, 0), layout))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def consume(plan: order.Plan, cursor: dict, counts: list[int]) -> list[int]:
    """Mark the first counts[s] delivery entries of each stream consumed; return their positions."""
    taken = []
    for s, n in enumerate(counts):
        cursor["streams"][s]["position"] = n
        taken += delivered(plan, s)[:n].tolist()
    return taken


@pytest.mark.parametrize("new_layout", [order.Layout(3, 1, 4, 4), order.Layout(1, 2, 2, 5), order.Layout(2, 2, 4, 3)])
def test_recut_takes_the_rest_in_epoch_list_order_none_skipped_none_repeated(new_layout):
    epoch_list = order.EpochList([UNEVEN], 7, 0)
    plan = order.Plan(epoch_list, order.Layout(2, 2, 3, 3))
    cursor = plan.new_cursor()
    taken = consume(plan, cursor, [4, 2, 7, 0])  # mid-block positions included
    new_plan, new_cursor = order.resume(epoch_list, new_layout, cursor)
    rest = all_delivered(new_plan)
    assert sorted(taken + rest.tolist()) == list(range(31))
    base = np.concatenate([np.arange(a, b) for a, b in decode_runs(new_cursor["base"]).tolist()])
    assert base.tolist() == sorted(set(range(31)) - set(taken))  # epoch-list order
    assert all(s == {"position": 0, "batches": 0} for s in new_cursor["streams"])

    # and a second re-cut of the re-cut (base with holes) still covers everything once
    taken2 = consume(new_plan, new_cursor, [1] * new_layout.num_streams)
    final_plan, _ = order.resume(epoch_list, order.Layout(1, 1, 4, 2), new_cursor)
    assert sorted(taken + taken2 + all_delivered(final_plan).tolist()) == list(range(31))


def test_same_layout_resume_keeps_plan_and_streams():
    epoch_list = order.EpochList([UNEVEN], 7, 0)
    layout = order.Layout(2, 1, 4, 3)
    plan = order.Plan(epoch_list, layout)
    cursor = plan.new_cursor()
    cursor["streams"][0] = {"position": 5, "batches": 2}
    same, resumed = order.resume(epoch_list, layout, cursor)
    assert resumed["streams"][0] == {"position": 5, "batches": 2}
    assert delivered(same, 0, 5).tolist() == delivered(plan, 0)[5:].tolist()


def test_cursor_from_other_data_or_seed_is_refused():
    plan = order.Plan(order.EpochList([UNEVEN], 1, 0), order.Layout(1, 1, 2, 2))
    cursor = plan.new_cursor()
    with pytest.raises(UserError, match="seed"):
        order.resume(order.EpochList([UNEVEN], 2, 0), plan.layout, cursor)
    other = order.Source((7, 3, 11, 1, 9), sha256="b" * 64)
    with pytest.raises(UserError, match="datasets"):
        order.resume(order.EpochList([other], 1, 0), plan.layout, cursor)
    rank0 = order.Plan(order.EpochList([UNEVEN], 1, 0), order.Layout(2, 1, 2, 2)).new_cursor(rank=0)
    with pytest.raises(UserError, match="merge_rank_cursors"):
        order.resume(order.EpochList([UNEVEN], 1, 0), plan.layout, rank0)


def test_merge_rank_cursors_combines_streams_and_refuses_mismatches():
    plan = order.Plan(order.EpochList([UNEVEN], 1, 0), order.Layout(2, 2, 2, 2))
    r0, r1 = plan.new_cursor(rank=0), plan.new_cursor(rank=1)
    r1["streams"][3] = {"position": 4, "batches": 2}
    merged = order.merge_rank_cursors([r0, r1])
    assert merged["streams"] == [{"position": 0, "batches": 0}] * 3 + [{"position": 4, "batches": 2}]
    assert "rank" not in merged
    r1["epoch"] = 1
    with pytest.raises(ValueError, match="epoch"):
        order.merge_rank_cursors([r0, r1])


def test_round_robin_schedule_rotates_after_a_partial_round():
    plan = order.Plan(order.EpochList([order.Source((40,))], 0, 0), order.Layout(1, 3, 2, 4))
    cursor = plan.new_cursor()
    full = plan.rank_schedule(cursor, 0)
    assert plan.batches_per_stream == 7 and full == [0, 1, 2] * 7
    for s, done in zip(range(3), (3, 3, 2)):  # 8 batches taken: streams 0, 1 one ahead
        cursor["streams"][s]["batches"] = done
    assert plan.rank_schedule(cursor, 0) == full[8:]
    assert plan.worker_streams(cursor, 0) == [2, 0, 1]


@pytest.mark.parametrize("weights,expected", [((1.0, 1.0), (31, 10)), ((2.0, 0.5), (62, 5)), ((0.5, 1.0), (16, 10))])
def test_mixture_contributes_round_weight_times_size(weights, expected):
    b = order.Source((4, 6), sha256="b" * 64)
    sources = [dataclasses_replace(UNEVEN, weight=weights[0]), dataclasses_replace(b, weight=weights[1])]
    epoch_list = order.EpochList(sources, 0, 0)
    assert len(epoch_list) == sum(expected)
    where = epoch_list.locate(np.arange(len(epoch_list)))
    for d, n in enumerate(expected):
        assert int((where.dataset == d).sum()) == n
        sel = where.dataset == d
        ids = list(zip(where.repeat[sel].tolist(), where.shard[sel].tolist(), where.index[sel].tolist()))
        assert len(set(ids)) == n  # a repeat is a new (repeat, sample), never the same entry twice
        samples = [(s, i) for _, s, i in ids]
        size = sources[d].size
        assert all(samples.count(x) == (n // size + (1 if k < n % size else 0)) for k, x in enumerate(samples[:size]))
    # evenly interleaved: any prefix holds each dataset in proportion, to within one sample
    total = len(epoch_list)
    for cut in range(1, total + 1):
        for d, n in enumerate(expected):
            assert abs(int((where.dataset[:cut] == d).sum()) - cut * n / total) <= 1.0 + 1e-9
    # the mixture is cut and resumed like one dataset
    plan = order.Plan(epoch_list, order.Layout(2, 1, 4, 3))
    assert sorted(all_delivered(plan).tolist()) == list(range(total))


def dataclasses_replace(source, **kw):
    import dataclasses

    return dataclasses.replace(source, **kw)


def test_layout_and_sample_seed():
    with pytest.raises(UserError, match="batch_size"):
        order.Layout(1, 1, 0, 4)
    a = order.sample_seed(0, 1, "k", "crop")
    assert a == order.sample_seed(0, 1, "k", "crop")
    assert (
        len(
            {
                a,
                order.sample_seed(0, 2, "k", "crop"),
                order.sample_seed(0, 1, "k2", "crop"),
                order.sample_seed(0, 1, "k", "mlm"),
            }
        )
        == 4
    )
